"""Scratch files for work that does not fit in memory (the FR filter's half spectra).

A scratch file is unnamed (tempfile.TemporaryFile) in the folder given, the merge's staging
folder: it has no path to leave behind if the run is killed, and closing it frees its disk
space. It is read and written with positioned reads and writes, not mapped (mapped pages would
count as the process's memory).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from checkpoints.checkpoint import read_exact, write_all
from checkpoints.errors import writing


class ScratchFile:
    """Bytes at offsets in an unnamed file in `folder` (None: the system's temporary folder)."""

    def __init__(self, folder: Path | None):
        self.folder = folder or Path(tempfile.gettempdir())
        with writing(self.folder):
            self._file = tempfile.TemporaryFile(dir=self.folder)

    def read(self, offset: int, into: memoryview) -> None:
        """Fill `into` with the bytes at `offset`."""
        read_exact(self._file.fileno(), into, offset, f"a scratch file in {self.folder}")

    def write(self, offset: int, data: memoryview) -> None:
        with writing(self.folder):
            write_all(self._file.fileno(), data, offset)

    def close(self) -> None:
        self._file.close()
