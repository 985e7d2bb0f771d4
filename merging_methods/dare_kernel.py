"""DARE's keep-mask multiply as a small compiled loop (dare_mask.c), built at first use.

On a CPU with AVX-512DQ, drawing a mask-rule-2 mask and multiplying a delta by it in one C loop
takes less than half the time of the numpy draw and torch multiply (primitives.py; 0.29 against
0.67 ns per entry, bench/bench_masks.py), with the same bits. It is compiled with the system C
compiler ($CC, else `cc`) and -march=native into a per-user cache, named by a hash of the
source, the compiler command and the CPU's flags (a cache shared between machines never loads
code built for another CPU), and accepted only after it reproduces the numpy path on a check
block. Without a compiler, on another CPU, or with
AIM_MERGING_KERNELS=0, the numpy path runs: the masks are the same either way.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("dare_mask.c")
SWITCH = "AIM_MERGING_KERNELS"   # "0": never build or load the kernel
REQUIRED_FLAG = "avx512dq"       # the 64-bit lane multiplies the loop is vectorised with
COMPILE_SECONDS = 120
STALE_SECONDS = 600   # a partial build older than this was left by a killed process

# (float32 contiguous CPU delta, mask key, flat index of its first entry, threshold t): in place
KeepMul = Callable[[torch.Tensor, int, int, int], None]


def cache_dir() -> Path:
    """Where built kernels are kept: $XDG_CACHE_HOME/aim-merging/kernels, ~/.cache when that is
    unset or relative (the XDG rule: a relative path would land in the working directory)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or "")
    return (root if root.is_absolute() else Path.home() / ".cache") / "aim-merging" / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them; "" where that is not available."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def compiler() -> list[str]:
    """The C compiler command: $CC (split like a shell would), else `cc`."""
    return shlex.split(os.environ.get("CC") or "cc")


def library_path(source: bytes, command: list[str], flags: str) -> Path:
    """The cached library built from `source` by `command` on a CPU with `flags`."""
    digest = hashlib.sha256(b"\0".join([source, " ".join(command).encode(), flags.encode()]))
    return cache_dir() / f"dare_mask-{digest.hexdigest()[:16]}.so"


def _remove_stale_builds(folder: Path) -> None:
    """Partial builds that a killed process left behind (a running build's is recent)."""
    for leftover in folder.glob("dare_mask-*.tmp"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_SECONDS:
                leftover.unlink()
        except OSError:
            pass


def build(target: Path, command: list[str]) -> None:
    """Compile dare_mask.c into `target`, through a temporary file renamed at the end (so a
    concurrent or killed build never leaves a partial library under the final name).
    Raises OSError or subprocess.CalledProcessError / TimeoutExpired when it cannot."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target.parent)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.stem + "-",
                                       suffix=".tmp")
    os.close(handle)
    try:
        subprocess.run([*command, "-O3", "-march=native", "-shared", "-fPIC", "-o", partial,
                        str(SOURCE)], check=True, capture_output=True, timeout=COMPILE_SECONDS)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _bind(library: Path) -> KeepMul:
    """The library's `dare_keep_mul` as a KeepMul (ctypes releases the GIL during the call)."""
    function = ctypes.CDLL(str(library)).dare_keep_mul
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int64,
                         ctypes.c_uint32]
    function.restype = None

    def keep_mul(delta: torch.Tensor, key: int, start: int, t: int) -> None:
        function(delta.data_ptr(), delta.numel(), key, start, t)
    return keep_mul


_lock = threading.Lock()


def keep_mul_kernel(agrees: Callable[[KeepMul], bool]) -> KeepMul | None:
    """The compiled kernel, built or loaded once per process (by whichever thread asks first)
    and used only if `agrees(kernel)`: a check against the numpy path; None where it is not
    available."""
    with _lock:
        return _load(agrees)


@functools.cache
def _load(agrees: Callable[[KeepMul], bool]) -> KeepMul | None:
    if os.environ.get(SWITCH) == "0":
        return None
    flags = cpu_flags()
    if REQUIRED_FLAG not in flags.split():
        return None
    command = compiler()
    library = library_path(SOURCE.read_bytes(), command, flags)
    try:
        if not library.exists():
            build(library, command)
        kernel = _bind(library)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        log.debug("DARE mask kernel not built (%s) %s; using numpy", error,
                  detail.decode(errors="replace").strip())
        return None
    if not agrees(kernel):
        log.warning("DARE mask kernel %s disagrees with the numpy masks; using numpy", library)
        return None
    return kernel
