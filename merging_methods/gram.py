"""Float64 Gram matrices over a tensor's row chunks, and results that are linear combinations of
the models (nuslerp's whole-tensor mode, multislerp, karcher: ALGORITHMS.md §19.4-19.6).

Those methods only need the dot products vi·vj of the flattened (task) vectors to find one
coefficient per model; the result is then Σ ki·vi (+ θ0), element by element. So their two-pass
form (streamed.py) gathers the Gram matrix in one streaming pass over the row chunks and applies
the coefficients chunk by chunk. Their whole-tensor functions run the very same code on an
in-memory source with the same chunks (rows.row_ranges), so both forms give the same bits.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from checkpoints.rows import row_ranges, rows_of
from merging_methods.gta_blocked import output_buffer
from merging_methods.streamed import RowSource

# entries per model worked on at once: float32 temporaries and float64 Gram blocks of this
# size, not of a chunk (with chunk-size temporaries karcher's peak RSS on the 542M family was
# 0.63 GiB; with these blocks and the stored-dtype fast path, 0.44 GiB)
BLOCK = 1 << 16
# (ki per model, on task vectors θi − θ0 or on the models θi); None: the one model as it is
Combination = tuple[list[float], bool] | None


def in_memory_source(base: Tensor, others: list[Tensor]) -> RowSource:
    """Whole tensors as the runner streams a large one: the chunks of rows.row_ranges."""
    shape = tuple(base.shape)
    return RowSource(shape, tuple(row_ranges(shape, True)),
                     lambda rows, i: (rows_of(base, rows), rows_of(others[i], rows)),
                     lambda rows: (rows_of(base, rows), [rows_of(o, rows) for o in others]),
                     base.device, len(others))


def vectors(base: Tensor, others: list[Tensor], task_vectors: bool) -> list[Tensor]:
    """The float32 task vectors θi − θ0 of (a block of) the tensors, one float32 subtraction of
    exact upcasts, or the models θi."""
    if not task_vectors:
        return [o.float() for o in others]
    b = base.float()
    return [o.float() - b for o in others]


def blocks(base: Tensor, others: list[Tensor], task_vectors: bool,
           width: int = 1) -> Iterator[tuple[slice, Tensor, list[Tensor]]]:
    """(row slice, float32 base, float32 vectors) of (a chunk of) the tensors viewed as
    (rows, width) matrices, about BLOCK entries of whole rows at a time (width 1: flat blocks
    of BLOCK entries), in order; the inputs may be stored bf16/fp16."""
    b, matrices = base.reshape(-1, width), [o.reshape(-1, width) for o in others]
    step = max(1, BLOCK // width)
    for start in range(0, b.shape[0], step):
        rows = slice(start, start + step)
        block = b[rows].float()
        yield rows, block, vectors(block, [m[rows] for m in matrices], task_vectors)


def add_gram(total: Tensor, base: Tensor, others: list[Tensor], task_vectors: bool) -> None:
    """total += the (N, N) Gram matrix vi·vj of one chunk's (task) vectors, summed in float64
    (float32 products are exact there) block by block, so its bits do not depend on memory
    alignment."""
    rows = torch.empty(len(others), min(base.numel(), BLOCK), dtype=torch.float64,
                       device=total.device)
    for _, _, xs in blocks(base, others, task_vectors):
        part = rows[:, : xs[0].numel()]
        for row, x in zip(part, xs):
            row.copy_(x.view(-1))
        total += part @ part.T


def gram(source: RowSource, task_vectors: bool) -> np.ndarray:
    """(N, N) float64 Gram matrix vi·vj of the whole flattened (task) vectors, streamed over the
    source's chunks in order."""
    total = torch.zeros(source.n_models, source.n_models, dtype=torch.float64,
                        device=source.device)
    for rows in source.chunks:
        base, others = source.read_all(rows)
        add_gram(total, base, others, task_vectors)
    return total.cpu().numpy()


def combine(combination: Combination, base: Tensor, others: list[Tensor],
            out: Tensor | None = None) -> Tensor:
    """Σ ki·vi (+ θ0 on task vectors) of (a chunk of) the tensors, in float32 block by block,
    into `out` (a float32 buffer shaped like base, or None); the one model as it is for None."""
    result = output_buffer(base, out).view(-1, 1)
    if combination is None:
        return result.copy_(others[0].reshape(-1, 1)).view(base.shape)
    coefficients, task_vectors = combination
    for rows, b, xs in blocks(base, others, task_vectors):
        acc = result[rows].zero_()
        for k, x in zip(coefficients, xs):
            acc.add_(x, alpha=k)
        if task_vectors:
            acc.add_(b)
    return result.view(base.shape)


def apply_combination(combination: Combination, offset: int, base: Tensor,  # noqa: ARG001
                      others: list[Tensor], *, out: Tensor | None = None, **_) -> Tensor:
    """A TwoPass `apply`: the combination of the chunk (row-local, so `offset` is not needed)."""
    return combine(combination, base, others, out)
