"""The FR filter (ALGORITHMS.md §10.2) as a separable real 2-D FFT over row groups and column
strips, held in memory or in a scratch file, so a matrix of any size is filtered in memory
bounded by the chunk size (issue 14 §2).

For a real δ [H, W] the filtered Re(IFFT2(FFT2(δ) ⊙ K)) equals IFFT2(FFT2(δ) ⊙ K_sym) with
K_sym(u, v) = (K(u, v) + K(−u mod H, −v mod W)) / 2, whose spectrum is Hermitian, so only its
W//2 + 1 first columns are needed (the real FFT; exact in math, and K_sym = K when H and W are
even). The 2-D DFT is a 1-D DFT along the rows, then along the columns:

    1. per row group: X = rfft(δ rows, along the row)                 [rows, W//2 + 1]
    2. per column strip of X: Y = ifft(fft(X strip, along H) ⊙ K_sym, along H)
    3. per row group: δ' rows = irfft(Y rows, n=W, along the row)

Row groups cut each row chunk (rows.row_ranges) from its first row, so the whole-tensor path
and the two-pass form run these very steps on the very groups and strips and get the same bits
whatever the FFT library does with batch sizes. The spectrum is stored strip after strip (each
strip's rows contiguous): a strip is one read, a row group one read per strip. The scratch file
(checkpoints/scratch.py) is unnamed, in the merge's staging folder: nothing is left behind if
the run is killed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from checkpoints import rows as row_chunks
from checkpoints.rows import RowRange, row_ranges
from checkpoints.scratch import ScratchFile

Strip = tuple[int, int]   # columns [start, stop) of the half spectrum
COMPLEX_BYTES = 8          # complex64
# a row group and a column strip hold CHUNK_ELEMENTS / PARTS entries: the FFTs' temporaries
# stay a few MiB, beside the chunks the runner holds
PARTS = 16


def column_strips(height: int, columns: int) -> list[Strip]:
    """Strips of whole columns of at most CHUNK_ELEMENTS / PARTS entries (at least one)."""
    step = max(1, row_chunks.CHUNK_ELEMENTS // PARTS // max(height, 1))
    return [(c, min(c + step, columns)) for c in range(0, columns, step)]


def row_groups(rows: RowRange, width: int) -> list[RowRange]:
    """The chunk `rows` in groups of whole rows of at most CHUNK_ELEMENTS / PARTS entries (at
    least one row), from its first row: both forms cut a chunk alike."""
    step = max(1, row_chunks.CHUNK_ELEMENTS // PARTS // max(width, 1))
    return [(r, min(r + step, rows[1])) for r in range(rows[0], rows[1], step)]


def chunk_delta(base: Tensor, other: Tensor) -> Tensor:
    """A fresh float32 δ = other − base: one subtraction of exact upcasts, the bits of
    primitives.Deltas."""
    return other.to(torch.float32, copy=True).sub_(base)


class MemoryStore:
    """Complex64 entries held in one flat tensor (the whole-tensor path)."""

    def __init__(self, count: int, device: torch.device):
        self.device = device
        self._flat = torch.empty(count, dtype=torch.complex64, device=device)

    def read(self, offset: int, count: int) -> Tensor:
        # a fresh tensor, as the file gives: the FFT then sees the same memory layout
        return self._flat[offset:offset + count].clone()

    def write(self, offset: int, values: Tensor) -> None:
        self._flat[offset:offset + values.numel()].copy_(values.reshape(-1))

    def close(self) -> None:
        self._flat = None


class FileStore:
    """Complex64 entries in a scratch file (checkpoints/scratch.py) in `folder` (None: the
    system's temporary folder); tensors come back on `device`."""

    def __init__(self, folder: Path | None, device: torch.device):
        self.device = device
        self._file = ScratchFile(folder)

    def read(self, offset: int, count: int) -> Tensor:
        values = torch.empty(count, dtype=torch.complex64)
        self._file.read(offset * COMPLEX_BYTES, memoryview(values.view(torch.uint8).numpy()))
        return values.to(self.device)

    def write(self, offset: int, values: Tensor) -> None:
        data = values.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(offset * COMPLEX_BYTES, memoryview(data))

    def close(self) -> None:
        self._file.close()


Store = MemoryStore | FileStore
KeepStrip = Callable[[Strip], Tensor]   # columns -> K_sym on them, float32 [H, columns]


class HalfSpectrum:
    """The half spectrum [H, W//2 + 1] of a real matrix [H, W], strip after strip in `store`."""

    def __init__(self, shape: tuple[int, int], store: Store):
        self.height, self.width = shape
        self.strips = column_strips(self.height, self.width // 2 + 1)
        self.store = store

    def _span(self, strip: Strip, rows: RowRange) -> tuple[int, int]:
        """(offset, count) of rows `rows` of strip `strip` in the store."""
        (c0, c1), (r0, r1) = strip, rows
        return self.height * c0 + r0 * (c1 - c0), (r1 - r0) * (c1 - c0)

    def put_rows(self, rows: RowRange, base: Tensor, other: Tensor) -> None:
        """Step 1 for the chunk `rows` of δ = other − base (stored dtypes), a row group at a
        time."""
        for group in row_groups(rows, self.width):
            part = slice(group[0] - rows[0], group[1] - rows[0])
            spectrum = torch.fft.rfft(chunk_delta(base[part], other[part]), dim=-1)
            for strip in self.strips:
                self.store.write(self._span(strip, group)[0], spectrum[:, strip[0]:strip[1]])

    def filter_(self, keep: KeepStrip) -> None:
        """Step 2, strip by strip, in place."""
        for strip in self.strips:
            offset, count = self._span(strip, (0, self.height))
            spectrum = self.store.read(offset, count).view(self.height, strip[1] - strip[0])
            spectrum = torch.fft.fft(spectrum, dim=0)   # (the read strip is freed here)
            spectrum = torch.fft.ifft(spectrum.mul_(keep(strip)), dim=0)
            self.store.write(offset, spectrum)

    def rows(self, rows: RowRange) -> Tensor:
        """Step 3: the rows `rows` (a row group) of the filtered δ' (float32)."""
        height = rows[1] - rows[0]
        spectrum = torch.empty(height, self.strips[-1][1], dtype=torch.complex64,
                               device=self.store.device)
        for strip in self.strips:   # (one strip's piece at a time beside it)
            piece = self.store.read(*self._span(strip, rows))
            spectrum[:, strip[0]:strip[1]] = piece.view(height, -1)
        return torch.fft.irfft(spectrum, n=self.width, dim=-1)

    def close(self) -> None:
        """Free the store (the scratch file is removed)."""
        self.store.close()


Rows = Callable[[RowRange], tuple[Tensor, Tensor]]   # rows -> (base rows, model rows)


def filtered_spectrum(shape: tuple[int, int], read: Rows, store: Store,
                      keep: KeepStrip) -> HalfSpectrum:
    """Steps 1 and 2 for δ = other − base, whose rows `read(rows)` gives, chunk by chunk."""
    spectrum = HalfSpectrum(shape, store)
    for rows in row_ranges(shape, True):
        spectrum.put_rows(rows, *read(rows))
    spectrum.filter_(keep)
    return spectrum


class FilteredRows:
    """blocked_gta's 'sparsifier' for a filtered δ: each block of δ (flat offset from the first
    row of `groups`) is replaced by the same entries of δ', inverted a row group at a time as
    the blocks pass in flat order, so one group of δ' is held, not the whole δ'."""

    def __init__(self, spectrum: HalfSpectrum, groups: list[RowRange]):
        self.spectrum, self.groups = spectrum, groups
        self._next, self._start = 0, 0           # the group after the held one; its offset
        self._rows = torch.empty(0, device=spectrum.store.device)   # the held group, flat

    def apply_(self, delta: Tensor, start: int) -> Tensor:
        done = 0
        while done < delta.numel():
            at = start + done - self._start
            if at >= self._rows.numel():
                self._start += self._rows.numel()
                self._rows = self.spectrum.rows(self.groups[self._next]).view(-1)
                self._next += 1
                continue
            take = min(delta.numel() - done, self._rows.numel() - at)
            delta[done:done + take] = self._rows[at:at + take]
            done += take
        return delta


def chunk_groups(shape: tuple[int, int]) -> list[RowRange]:
    """The row groups of a whole matrix, chunk after chunk (rows.row_ranges)."""
    return [group for rows in row_ranges(shape, True) for group in row_groups(rows, shape[1])]
