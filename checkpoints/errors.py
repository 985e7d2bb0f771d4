"""User-facing errors and the one place that turns them into a clean exit.

Every problem a user can fix (a wrong flag, a missing file, mismatched checkpoints) is raised
as `UserError` with one line that names the flag or file and says what to do. Entry scripts
wrap their work in `exit_code_for_user_errors`, which prints that line and returns exit code 2
instead of a traceback.
"""
from __future__ import annotations

import atexit
import errno
import gc
import os
import signal
import sys
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator, NoReturn


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit code 2."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type name."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


@contextmanager
def writing(path: Path | str, flag: str = "--save_path") -> Iterator[None]:
    """Turn an OSError raised while writing `path` (disk full, permissions) into a UserError."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"disk full while writing {path}; free space there or choose "
                            f"another {flag}") from None
        raise UserError(f"cannot write {path} ({first_line(err)}); check permissions and free "
                        f"space, or choose another {flag}") from None


def check_writable(folder: Path | str, flag: str) -> None:
    """Create `folder` if needed and a file in it, now, so that an unwritable output fails
    before hours of work instead of after."""
    folder = Path(folder)
    with writing(folder, flag):
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()


def _raise_keyboard_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def exit_code_for_user_errors(work: Callable[[], int]) -> int:
    """Run `work`; map UserError to exit 2 and Ctrl-C / SIGTERM to exit 130, one line each.

    SIGTERM is turned into KeyboardInterrupt so that staged output folders are cleaned up
    (see `output.staged_output`) when a job scheduler stops the run.
    """
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return work()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output path", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_process(code: int, *, teardown: bool = False) -> NoReturn:
    """End an entry script with exit `code`, skipping the interpreter's teardown: the atexit
    handlers run and stdout/stderr are flushed, then `os._exit`. Freeing torch's ~170K objects
    and the modules one by one took 0.1 s of every run's exit here (a 2 s merge spends 5% of
    its time there). Every output is closed before this point (the staged output folder is
    renamed only once complete).

    `teardown=True` keeps the teardown, without its garbage collections (gc.freeze: they
    walked every object, 0.14 s): for a script whose libraries release resources in object
    finalizers (evaluate_model.py: vLLM's workers, lm-eval's pools)."""
    if teardown:
        gc.freeze()
        raise SystemExit(code)
    atexit._run_exitfuncs()   # logging.shutdown, concurrent.futures' joins, multiprocessing
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):   # a closed pipe or stream has nothing to flush to
            stream.flush()
    os._exit(code)
