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

GRAM_BLOCK = 1 << 16  # entries per model per float64 block of the Gram sums
# (ki per model, on task vectors θi − θ0 or on the models θi); None: the one model as it is
Combination = tuple[list[float], bool] | None


def in_memory_source(base: Tensor, others: list[Tensor]) -> RowSource:
    """Whole tensors as the runner streams a large one: the chunks of rows.row_ranges."""
    shape = tuple(base.shape)
    return RowSource(shape, tuple(row_ranges(shape, True)),
                     lambda rows, i: (rows_of(base, rows), rows_of(others[i], rows)),
                     lambda rows: (rows_of(base, rows), [rows_of(o, rows) for o in others]),
                     base.device, len(others))


def chunk_vectors(source: RowSource, task_vectors: bool) -> Iterator[tuple[Tensor, list[Tensor]]]:
    """(base rows, float32 vectors of every model) for each chunk in order: θi − θ0 (one float32
    subtraction of exact upcasts) or θi; the base in its stored dtype."""
    for rows in source.chunks:
        base, others = source.read_all(rows)
        yield base, vectors(base, others, task_vectors)


def vectors(base: Tensor, others: list[Tensor], task_vectors: bool) -> list[Tensor]:
    """The float32 task vectors θi − θ0 of (a chunk of) the tensors, or the models θi."""
    if not task_vectors:
        return [o.float() for o in others]
    b = base.float()
    return [o.float() - b for o in others]


def add_gram(total: Tensor, xs: list[Tensor]) -> None:
    """total += the (N, N) Gram matrix xi·xj of one chunk's float32 tensors, summed in float64
    (float32 products are exact there) in fixed blocks of GRAM_BLOCK entries, so its bits do not
    depend on memory alignment."""
    flat = [x.reshape(-1) for x in xs]
    n = flat[0].numel()
    block = torch.empty(len(xs), min(n, GRAM_BLOCK), dtype=torch.float64, device=total.device)
    for start in range(0, n, GRAM_BLOCK):
        part = block[:, : min(GRAM_BLOCK, n - start)]
        for row, x in zip(part, flat):
            row.copy_(x[start:start + GRAM_BLOCK])
        total += part @ part.T


def gram(source: RowSource, task_vectors: bool) -> np.ndarray:
    """(N, N) float64 Gram matrix vi·vj of the whole flattened (task) vectors, streamed over the
    source's chunks in order."""
    total = torch.zeros(source.n_models, source.n_models, dtype=torch.float64,
                        device=source.device)
    for _, xs in chunk_vectors(source, task_vectors):
        add_gram(total, xs)
    return total.cpu().numpy()


def combine(combination: Combination, base: Tensor, others: list[Tensor],
            out: Tensor | None = None) -> Tensor:
    """Σ ki·vi (+ θ0 on task vectors) of (a chunk of) the tensors, in float32, into `out` (a
    float32 buffer shaped like base, or None); the one model as it is for None."""
    result = output_buffer(base, out).view(base.shape)
    if combination is None:
        return result.copy_(others[0])
    coefficients, task_vectors = combination
    result.zero_()
    for k, v in zip(coefficients, vectors(base, others, task_vectors)):
        result.add_(v, alpha=k)
    return result.add_(base.float()) if task_vectors else result


def apply_combination(combination: Combination, offset: int, base: Tensor,  # noqa: ARG001
                      others: list[Tensor], *, out: Tensor | None = None, **_) -> Tensor:
    """A TwoPass `apply`: the combination of the chunk (row-local, so `offset` is not needed)."""
    return combine(combination, base, others, out)
