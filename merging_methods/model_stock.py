"""Model Stock (Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv 2403.19522; ALGORITHMS.md §8, §19.3).

Interpolate between the base and the average of N ≥ 2 fine-tunes with a factor derived from the
angles between their task vectors. Per tensor (per row with `filter_wise`):

    oi = θi − θ0;  cos_ij = clamp(oi·oj / max(‖oi‖‖oj‖, 1e-6), −1, 1) for every pair i < j
    c = mean of cos_ij;  t = N·c / (1 + (N − 1)·c)   (t = 0 where |1 + (N − 1)·c| < 1e-6)
    out = t·mean_i(θi) + (1 − t)·θ0

`filter_wise` computes c and t separately for every slice along the last axis (each row of a
2-D [out, in] weight); a 1-D tensor is one row either way.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch import Tensor

from checkpoints.rows import row_ranges, rows_of
from merging_methods.gta_blocked import output_buffer
from merging_methods.streamed import RowSource, TwoPass

COS_EPS = 1e-6  # floor of the cosine denominators
DENOM_EPS = 1e-6  # |1 + (N − 1)·c| below this gives t = 0 (the base)
PIECE = 1 << 18  # elements worked on at once: float32 temporaries of a piece, not of a chunk


def _rows(tensor: Tensor, row_wise: bool) -> Tensor:
    """(R, C), stored dtype: the rows of the last axis with row_wise, else the tensor as one row."""
    return tensor.reshape(-1, tensor.shape[-1] if row_wise else tensor.numel())


def _pieces(rows: int, cols: int, row_wise: bool) -> Iterator[tuple[slice, slice]]:
    """About PIECE elements of an (R, C) matrix at a time, in order: groups of whole rows with
    row_wise (so each row's dot is one float32 sum, as on the whole), else slices of the row."""
    if row_wise:
        step = max(1, PIECE // max(cols, 1))
        for start in range(0, rows, step):
            yield slice(start, start + step), slice(None)
    else:
        for start in range(0, max(cols, 1), PIECE):
            yield slice(None), slice(start, start + PIECE)


def chunk_gram(base: Tensor, others: list[Tensor], row_wise: bool) -> Tensor:
    """(R, N, N) float64: oi·oj of the task vectors in these rows, one matrix per row with
    row_wise, else one for the chunk; float32 sums over each piece (_pieces), added in double."""
    b, stored = _rows(base, row_wise), [_rows(other, row_wise) for other in others]
    n = len(others)
    gram = torch.zeros(b.shape[0], n, n, dtype=torch.float64, device=b.device)
    for rows, cols in _pieces(*b.shape, row_wise):
        piece = b[rows, cols].float()
        offsets = [o[rows, cols].float() - piece for o in stored]  # (r, c) each
        for i, j in itertools.combinations_with_replacement(range(n), 2):
            dots = (offsets[i] * offsets[j]).sum(1)
            gram[rows, i, j] += dots
            if i != j:
                gram[rows, j, i] += dots
    return gram


def add_gram(total: Tensor | None, part: Tensor, row_wise: bool) -> Tensor:
    """Chunks' Gram matrices combined: rows stacked (row_wise) or summed in double."""
    if total is None:
        return part
    return torch.cat([total, part]) if row_wise else total.add_(part)


def factor(gram: Tensor) -> Tensor:
    """(R, 1) float32 t = N·c / (1 + (N − 1)·c), c the mean pairwise cosine (§8)."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()  # (R, N)
    cosines = [(gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=COS_EPS)).clamp(-1.0, 1.0)
               for i, j in itertools.combinations(range(n), 2)]
    c = torch.stack(cosines).mean(0)  # (R,)
    denom = 1 + (n - 1) * c
    flat = denom.abs() < DENOM_EPS
    return torch.where(flat, 0.0, n * c / torch.where(flat, 1.0, denom)).float()[:, None]


def interpolate(t: Tensor, base: Tensor, others: list[Tensor], row_wise: bool,
                out: Tensor | None = None) -> Tensor:
    """t·mean(θi) + (1 − t)·θ0 on (rows of) the tensor, t per row or one for all, into `out`
    (a float32 buffer shaped like base, or None); the sum of the θi is accumulated piece by
    piece (_pieces) in float32, so temporaries are a few pieces."""
    b, stored = _rows(base, row_wise), [_rows(other, row_wise) for other in others]
    result = output_buffer(base, out).view(b.shape)
    for rows, cols in _pieces(*b.shape, row_wise):
        total = result[rows, cols].zero_()
        for other in stored:
            total.add_(other[rows, cols])
        piece, tp = b[rows, cols].float(), t[rows]
        total.div_(len(others)).mul_(tp).add_(piece * (1 - tp))
    return result.view(base.shape)


def model_stock(base: Tensor, others: list[Tensor], *, filter_wise: bool = False,
                out: Tensor | None = None) -> Tensor:
    """t·mean(θi) + (1 − t)·θ0 with t from the mean pairwise cosine of the task vectors (§8).
    The dots are summed over the row chunks the runner streams (rows.row_ranges), in double,
    so that the two-pass form gets the same bits. Inputs may be stored bf16/fp16 (read in
    float32 pieces); `out` is an optional float32 result buffer."""
    n = len(others)
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {n}")
    if base.numel() == 0:
        return base.float().clone()
    row_wise = filter_wise and base.dim() >= 2
    gram = None
    for rows in row_ranges(base.shape, split=True):
        part = chunk_gram(rows_of(base, rows), [rows_of(o, rows) for o in others], row_wise)
        gram = add_gram(gram, part, row_wise)
    return interpolate(factor(gram), base, others, row_wise, out)


def _stats(source: RowSource, *, filter_wise: bool) -> Tensor:
    row_wise = filter_wise and len(source.shape) >= 2
    gram = None
    for rows in source.chunks:
        gram = add_gram(gram, chunk_gram(*source.read_all(rows), row_wise), row_wise)
    return factor(gram)


def _apply(t: Tensor, offset: int, base: Tensor, others: list[Tensor], *, filter_wise: bool,
           out: Tensor | None = None, **_) -> Tensor:
    row_wise = filter_wise and base.dim() >= 2
    if row_wise:   # the rows of the last axis this chunk holds
        first = offset // base.shape[-1]
        t = t[first:first + base.numel() // base.shape[-1]]
    return interpolate(t, base, others, row_wise, out)


MODEL_STOCK_TWO_PASS = TwoPass(_stats, _apply)  # the Gram matrices from the chunks, then rows
