"""Row ranges of a tensor: the chunks it is streamed in, and each model's rows for a chunk.

Work whose formula is per element (a per-element merge method, AIM's relaxation) streams a
tensor in chunks of whole rows of at most CHUNK_ELEMENTS elements, so peak memory is a few
chunks instead of a few float32 copies of the largest tensor (a 13B model's embedding is 650 MB
in float32). Work that looks at a whole tensor (top-k, column norms) gets one chunk covering it,
unless the tensor is above TWO_PASS_ELEMENTS: a method with a two-pass form then gathers its
whole-tensor facts in streaming passes over the chunks first (merging_methods/streamed.py).

Vocab tensors are fitted to the output's rows here (ALGORITHMS.md §13): rows beyond the output
are never read; rows a model lacks are the base's (`--vocab base`, no delta) or the model's own
mean row (`--vocab union`).
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch

from checkpoints.checkpoint import CheckpointReader

# 8 MiB of float32 per chunk and per model (542M family: task_arithmetic peak RSS 0.31-0.34 GB,
# DARE-l1 0.45-0.48 GB, at the same speed; at 1 << 22 0.42 / 0.56-0.59 GB)
CHUNK_ELEMENTS = 1 << 21
# 32 MiB of float32: a larger tensor is merged in row chunks by methods with a two-pass form
# (smaller ones stay whole: one pass, and a few of them fit in memory). At 1 << 20 (every
# attention matrix too) DARE-l1 and TIES took 5-10% longer, peak RSS 0.38-0.41 GB
TWO_PASS_ELEMENTS = 1 << 23
RowRange = tuple[int, int]


def too_large_to_hold(shape: tuple[int, ...], most: int | None = None) -> bool:
    """Whether a tensor goes in row chunks even for a method that needs whole-tensor facts: a
    matrix above TWO_PASS_ELEMENTS, or above `most` for a method that holds less (a 1-D tensor
    is one row for row-wise statistics, and never that large in a model)."""
    limit = TWO_PASS_ELEMENTS if most is None else min(most, TWO_PASS_ELEMENTS)
    return len(shape) >= 2 and math.prod(shape) > limit


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


def rows_of(tensor: torch.Tensor, rows: RowRange | None) -> torch.Tensor:
    """The rows `rows` of `tensor` (all of it for None, a 0-d tensor's chunk)."""
    return tensor if rows is None else tensor[rows[0]:rows[1]]


def mean_row(chunks: Iterable[torch.Tensor]) -> torch.Tensor:
    """The mean of a matrix's rows given as row chunks (1 x width), rounded to the matrix's
    dtype: the row the reference's resize writes into a model held in that dtype. Accumulated in
    float64, so the result does not depend on how the rows were chunked."""
    total, count, dtype = None, 0, None
    for chunk in chunks:
        part = chunk.to(torch.float64).sum(dim=0, keepdim=True)
        total = part if total is None else total.add_(part)
        count, dtype = count + chunk.shape[0], chunk.dtype
    return (total / count).to(dtype)


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
