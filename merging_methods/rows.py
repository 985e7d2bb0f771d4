"""Row ranges of a planned tensor: the chunks it is merged in, and each model's rows for a chunk.

A method whose formula is per element (registry `splits_by_rows`) merges a tensor in chunks of
whole rows of at most CHUNK_ELEMENTS elements, so peak memory is a few chunks instead of a few
float32 copies of the largest tensor (a 13B model's embedding is 650 MB in float32). Methods
that look at a whole tensor (top-k, column norms) get one chunk covering it.

Vocab tensors are fitted to the output's rows here (ALGORITHMS.md §13): rows beyond the output
are never read; rows a model lacks are the base's (`--vocab base`, no delta) or the model's own
mean row (`--vocab union`).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from merging_methods.checkpoint import CheckpointReader
from merging_methods.vocab import mean_row

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per chunk and per model
RowRange = tuple[int, int]


def row_ranges(shape: tuple[int, ...], split: bool) -> Iterator[RowRange | None]:
    """Chunks of whole rows of at most CHUNK_ELEMENTS elements (at least one row; one chunk
    when not `split`); a 0-d tensor yields None (the whole tensor)."""
    if not shape:
        yield None
        return
    rows = shape[0]
    per_row = math.prod(shape[1:])
    step = max(1, CHUNK_ELEMENTS // max(per_row, 1)) if split else max(rows, 1)
    for start in range(0, max(rows, 1), step):   # a 0-row tensor is one empty chunk
        yield start, min(start + step, rows)


class AlignedRows:
    """One model's view of one planned tensor, fitted to the output's rows.

    `own_rows` is how many rows the model's tensor has when it is a vocab tensor (None: any other
    tensor, read as is). `fill` says what rows past `own_rows` hold: "base" (the base's rows,
    passed in by the caller) or "mean" (this model's mean row, computed once over all its rows).
    """

    def __init__(self, reader: CheckpointReader, name: str, own_rows: int | None = None,
                 fill: str = "base"):
        self.reader, self.name, self.own_rows, self.fill = reader, name, own_rows, fill
        self._mean: torch.Tensor | None = None

    def get(self, rows: RowRange | None, base_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `rows` (stored dtype); missing vocab rows filled per `fill` (`base_rows`: the
        base's rows of the same range, needed for the "base" fill)."""
        if rows is None or self.own_rows is None or rows[1] <= self.own_rows:
            return self.reader.get(self.name, rows)
        start, stop = rows
        missing = stop - max(start, self.own_rows)
        if self.fill == "mean":
            filler = self.mean_row().expand(missing, -1)
        else:
            filler = base_rows[base_rows.shape[0] - missing:]
        if start >= self.own_rows:
            return filler.clone()
        own = self.reader.get(self.name, (start, self.own_rows))
        dtype = torch.promote_types(own.dtype, filler.dtype)
        return torch.cat([own.to(dtype), filler.to(dtype)], dim=0)

    def mean_row(self) -> torch.Tensor:
        """The mean of all own rows (1 x width, stored dtype), read chunk by chunk."""
        if self._mean is None:
            width_shape = self.reader.info[self.name].shape
            self._mean = mean_row(self.reader.get(self.name, chunk)
                                  for chunk in row_ranges(width_shape, split=True))
        return self._mean
