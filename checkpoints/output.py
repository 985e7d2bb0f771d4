"""Output folders of merge.py and performAIM.py: what may be written or replaced, and how.

Rules (issue 11; a merge tool runs next to models that took weeks to train):
* the output may not be an input, contain an input, or be (or contain) the working directory;
* an existing non-empty folder is replaced only with `--overwrite`, and only when it holds an
  earlier output of this toolkit (its `merge_recipe.yaml`), never an arbitrary folder;
* the model is written to a hidden sibling `.NAME.partial-PID-XXXX` and renamed to NAME at the
  end; an earlier output being replaced is first moved to `.NAME.old-PID-XXXX` and put back if
  the rename fails;
* `kill -9` (an out-of-memory kill) skips all cleanup, so every run first clears the leftovers
  of dead runs to the same path: it removes their staging folders, and puts back an earlier
  output that a kill left moved aside. Folders of live processes are never touched.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from checkpoints.errors import UserError, first_line
from checkpoints.record import RECIPE_FILE

log = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"(?P<kind>partial|old)-(?P<pid>\d+)(?:-.*)?")


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def check_apart_from_inputs(save_path: Path | str, inputs: Iterable[str | Path] = (),
                           flag: str = "--save_path") -> Path:
    """Refuse (UserError naming `flag`) an output that is, contains or lies inside one of the
    `inputs` (those that do not exist locally are skipped), or that is the working directory or
    one of its parents; returns the resolved output path."""
    save = Path(save_path).expanduser().resolve()
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        source = Path(given).expanduser().resolve()
        if _contains(save, source) or _contains(source, save):
            relation = ("is" if source == save else "contains" if _contains(save, source)
                        else "is inside")
            raise UserError(f"{flag}: {save_path} {relation} the input {given}; choose an output "
                            "path outside every input")
    if _contains(save, Path.cwd().resolve()):
        raise UserError(f"{flag}: {save_path} is the working directory or one of its parents; "
                        "choose a new folder for the output")
    return save


def check_output_path(save_path: Path | str, overwrite: bool, inputs: Iterable[str | Path] = (),
                      flag: str = "--save_path", marker: str = RECIPE_FILE) -> None:
    """Refuse an output that would destroy an input, write inside one, replace the working
    directory or a folder that is not ours, i.e. lacks the `marker` file our outputs carry
    (call before any heavy work)."""
    save = check_apart_from_inputs(save_path, inputs, flag)
    if save.exists() and not save.is_dir():
        raise UserError(f"{flag}: {save_path} is a file; choose a folder path")
    if not (save.is_dir() and any(save.iterdir())):
        return
    if not overwrite:
        raise UserError(f"{flag}: {save_path} already exists and is not empty; choose another "
                        "path or pass --overwrite")
    if not (save / marker).is_file():
        raise UserError(f"{flag}: {save_path} holds files but no {marker}, so it is not an "
                        "earlier output of this toolkit and will not be replaced; "
                        "empty it yourself or choose another path")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def clear_leftovers(save_path: Path) -> None:
    """Remove the staging folders that dead runs to `save_path` left beside it, and put back an
    earlier output that a run killed while replacing it left moved aside."""
    save_path = Path(save_path).expanduser().resolve()
    prefix = f".{save_path.name}."
    if not save_path.parent.is_dir():
        return
    for path in sorted(save_path.parent.iterdir()):
        match = _LEFTOVER.fullmatch(path.name[len(prefix):]) if path.name.startswith(prefix) else None
        if not match or not path.is_dir() or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not save_path.exists():
            path.rename(save_path)
            log.warning("restored %s from %s, where a run (pid %s) killed while replacing it left "
                        "it", save_path, path.name, match["pid"])
            continue
        size = _folder_mb(path)
        try:
            shutil.rmtree(path)
        except OSError as err:
            log.warning("could not remove %s left by a killed run (%s); delete it by hand", path,
                        first_line(err))
            continue
        log.warning("removed %s (%.1f MB) left by a run (pid %s) that was killed", path, size,
                    match["pid"])


def prepare_output(save_path: Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Clear dead runs' leftovers beside `save_path`, then check it (`check_output_path`)."""
    clear_leftovers(save_path)
    check_output_path(save_path, overwrite, inputs)


def _replace(tmp: Path, save_path: Path) -> None:
    """Rename the finished `tmp` to `save_path`; an earlier output there is moved aside first,
    put back if the rename fails, and deleted after it succeeded."""
    if not save_path.exists():
        tmp.rename(save_path)
        return
    old = tmp.with_name(f".{save_path.name}.old-{tmp.name.rsplit('.partial-', 1)[1]}")
    try:
        save_path.rename(old)
        tmp.rename(save_path)
    except BaseException:
        if old.exists() and not save_path.exists():
            old.rename(save_path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_output(save_path: Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a new hidden sibling folder; on success it replaces `save_path`.

    On any exception (including Ctrl-C) the folder is removed and `save_path` is left as it was.
    """
    save_path = Path(save_path).expanduser().resolve()
    prepare_output(save_path, overwrite, inputs)
    try:
        save_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = save_path.parent / f".{save_path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()   # not tempfile.mkdtemp: its mode 0o700 would become the output's
    except OSError as err:
        raise UserError(f"--save_path: cannot create a folder in {save_path.parent} "
                        f"({first_line(err)}); check permissions or choose another path")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, save_path)
