"""NuSLERP: SLERP between two models by weight, of whole tensors, rows or columns, of the models
or of their task vectors (mergekit 0.1.5's own method, no paper; ALGORITHMS.md §19.4).

With weights (w1, w2) of the two models in order, t = w2 / (w1 + w2) (t = 0.5 when
|w1 + w2| < 1e-6; no range check, so opposite signs extrapolate). Operands x, y are the task
vectors θ1 − θ0, θ2 − θ0 (`task_vectors`, mergekit with a base_model; the base is added back)
or the models θ1, θ2 themselves. For each vector pair:

    x̂ = x / max(‖x‖, 1e-7), ŷ likewise;  c = clamp(x̂·ŷ, −1, 1)
    1 − c² ≤ 1e-16 (colinear):  (1 − t)·x + t·y
    otherwise, θ = arccos c:     (sin((1 − t)θ)·x + sin(tθ)·y) / sin θ

Unlike `slerp` there is no 0.9995 cut-off. The vectors: the whole tensor (`nuslerp_flatten`, the
default), else every slice along the last axis (each row of a matrix), or, with
`nuslerp_row_wise`, along the first axis (each COLUMN of a matrix: mergekit's code, whose docs
say "row vectors"). A 1-D tensor is one vector either way.

Decisions: float32 elementwise arithmetic (mergekit computes in the input dtype, bf16 in bf16
merges); each pair's x·y, ‖x‖², ‖y‖² are summed in float64 (whole tensor: the float64 Gram
matrix of gram.py; rows and columns: sums of float32 products), and the coefficients of x and y
are computed from them in float64, then rounded to float32.

Memory: it streams. For a matrix too large to hold whole (NUSLERP_TWO_PASS): the whole-tensor
mode gathers its three sums, the column mode its per-column sums, in one pass over the row
chunks, then merges chunk by chunk; the row mode is row-local (a chunk is whole rows). The
whole-tensor function sums over the same row chunks (rows.row_ranges), so both forms give the
same bits.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from merging_methods.gram import Combination, blocks, combine, gram, in_memory_source
from merging_methods.gta_blocked import output_buffer
from merging_methods.streamed import RowSource, TwoPass

WEIGHT_SUM_EPS = 1e-6  # |w1 + w2| below this: t = 0.5
NORM_FLOOR = 1e-7  # norms are clamped to this before dividing
COLINEAR = 1e-16  # 1 − c² at or below this: lerp
Pairs = tuple[Tensor, Tensor]   # float32 coefficients (a, b) of S = a·x + b·y, per column


def interpolation_factor(weights: list[float]) -> float:
    """t = w2 / (w1 + w2), or 0.5 when the weights sum to about 0."""
    w1, w2 = weights
    return 0.5 if abs(w1 + w2) < WEIGHT_SUM_EPS else w2 / (w1 + w2)


def grouping(dims: int, flatten: bool, row_wise: bool) -> str:
    """"whole" (one vector), "rows" (slices along the last axis) or "columns" (along axis 0)."""
    if flatten or dims <= 1:
        return "whole"
    return "columns" if row_wise else "rows"


def coefficients(xy: Tensor, xx: Tensor, yy: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """float64 (a, b) with S(x, y) = a·x + b·y for each vector pair, given its sums x·y, ‖x‖²
    and ‖y‖² (float64): the slerp coefficients, or (1 − t, t) for a colinear pair."""
    def norm(square: Tensor) -> Tensor:
        return square.clamp(min=0.0).sqrt().clamp(min=NORM_FLOOR)

    c = (xy / (norm(xx) * norm(yy))).clamp(-1.0, 1.0)
    colinear = 1.0 - c * c <= COLINEAR
    theta = torch.acos(c)
    sin_theta = torch.sin(theta).masked_fill(colinear, 1.0)
    a = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return a, b


def pair_sums(x: Tensor, y: Tensor, dim: int) -> Tensor:
    """(3, ...) x·y, ‖x‖², ‖y‖² of float32 matrices along `dim`: float32 products summed in
    float64."""
    return torch.stack([(p * q).sum(dim, dtype=torch.float64)
                        for p, q in ((x, y), (x, x), (y, y))])


def stats(source: RowSource, *, weights: list[float], nuslerp_row_wise: bool = False,
          nuslerp_flatten: bool = True, task_vectors: bool = True,
          **_) -> Combination | Pairs | None:
    """What needs more than a chunk: the whole-tensor mode's combination (from the Gram matrix
    of x, y), or the column mode's per-column coefficients; nothing for the row mode."""
    t = interpolation_factor(weights)
    mode = grouping(len(source.shape), nuslerp_flatten, nuslerp_row_wise)
    if mode == "rows":
        return None
    if mode == "whole":
        products = torch.from_numpy(gram(source, task_vectors))
        a, b = coefficients(products[0, 1], products[0, 0], products[1, 1], t)
        return [float(a), float(b)], task_vectors
    cols = math.prod(source.shape[1:])
    sums = torch.zeros(3, cols, dtype=torch.float64, device=source.device)
    for rows in source.chunks:
        for _, _, (x, y) in blocks(*source.read_all(rows), task_vectors, cols):
            sums += pair_sums(x, y, 0)
    a, b = coefficients(*sums, t)
    return a.float(), b.float()


def apply(facts: Combination | Pairs | None, offset: int, base: Tensor,  # noqa: ARG001
          others: list[Tensor], *, weights: list[float], nuslerp_row_wise: bool = False,
          nuslerp_flatten: bool = True, task_vectors: bool = True,
          out: Tensor | None = None, **_) -> Tensor:
    """The chunk `base`, `others` (whole rows; stored dtype or float32) merged with `stats`'
    facts, into `out` (a float32 buffer shaped like base, or None)."""
    mode = grouping(base.dim(), nuslerp_flatten, nuslerp_row_wise)
    if mode == "whole":
        return combine(facts, base, others, out)
    cols = base.shape[-1] if mode == "rows" else math.prod(base.shape[1:])
    result = output_buffer(base, out).view(-1, cols)
    t = interpolation_factor(weights)
    for rows, b, (x, y) in blocks(base, others, task_vectors, cols):
        if mode == "rows":
            a, c = (f.float()[:, None] for f in coefficients(*pair_sums(x, y, -1), t))
        else:
            a, c = facts
        piece = torch.mul(x, a, out=result[rows]).addcmul_(y, c)
        if task_vectors:
            piece.add_(b)
    return result.view(base.shape)


def nuslerp(base: Tensor, others: list[Tensor], *, weights: list[float],
            nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True,
            task_vectors: bool = True, out: Tensor | None = None) -> Tensor:
    """SLERP of the two models (or their task vectors) at t = w2/(w1 + w2), per tensor, row or
    column (§19.4). Inputs may be stored bf16/fp16 (read in float32 blocks); `out` is an
    optional float32 result buffer. Paper box: reference.nuslerp."""
    if len(others) != 2:
        raise ValueError(f"nuslerp merges exactly 2 models, got {len(others)}")
    params = dict(weights=weights, nuslerp_row_wise=nuslerp_row_wise,
                  nuslerp_flatten=nuslerp_flatten, task_vectors=task_vectors)
    return apply(stats(in_memory_source(base, others), **params), 0, base, others, **params,
                 out=out)


# the whole tensor's or the columns' sums from the chunks, then the chunks (rows: row-local)
NUSLERP_TWO_PASS = TwoPass(stats, apply)
