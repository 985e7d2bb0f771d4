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

Decision: float32 arithmetic (mergekit computes in the input dtype, bf16 in bf16 merges). It
needs the whole tensor (norms): besides the inputs, up to 4 float32 copies of it at once (the two
task vectors, x·y and the result; 2 more with nuslerp_row_wise, whose columns are copied out).
"""
from __future__ import annotations

import torch
from torch import Tensor

from merging_methods.primitives import vector_norm

WEIGHT_SUM_EPS = 1e-6  # |w1 + w2| below this: t = 0.5
NORM_FLOOR = 1e-7  # norms are clamped to this before dividing
COLINEAR = 1e-16  # 1 − c² at or below this: lerp


def interpolation_factor(weights: list[float]) -> float:
    """t = w2 / (w1 + w2), or 0.5 when the weights sum to about 0."""
    w1, w2 = weights
    return 0.5 if abs(w1 + w2) < WEIGHT_SUM_EPS else w2 / (w1 + w2)


def as_vectors(x: Tensor, flatten: bool, row_wise: bool) -> Tensor:
    """`x` as a (vectors, length) matrix: one flat vector, its rows, or (row_wise) its columns;
    `from_vectors` undoes it."""
    if flatten or x.dim() <= 1:
        return x.reshape(1, -1)
    if row_wise:
        x = x.transpose(0, -1)
    return x.reshape(-1, x.shape[-1])


def from_vectors(v: Tensor, like: Tensor, flatten: bool, row_wise: bool) -> Tensor:
    """The (vectors, length) matrix `v` back in the shape of `like` (inverse of as_vectors)."""
    if flatten or like.dim() <= 1 or not row_wise:
        return v.reshape(like.shape)
    return v.reshape(like.transpose(0, -1).shape).transpose(0, -1).contiguous()


def slerp_rows(x: Tensor, y: Tensor, t: float) -> Tensor:
    """Spherical interpolation of each row of x (t = 0) with the same row of y (t = 1), on the
    un-normalised rows; colinear rows are lerped. Per-row coefficients, so the only full-size
    temporaries are x·y and the result."""
    def norm(v: Tensor) -> Tensor:
        return vector_norm(v, dim=-1, keepdim=True).clamp_(min=NORM_FLOOR)

    c = ((x * y).sum(-1, keepdim=True) / (norm(x) * norm(y))).clamp(-1.0, 1.0)   # (vectors, 1)
    colinear = 1.0 - c * c <= COLINEAR
    theta = torch.acos(c)
    sin_theta = torch.sin(theta).masked_fill(colinear, 1.0)
    a = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return torch.mul(x, a).addcmul_(y, b)


def nuslerp(base: Tensor, others: list[Tensor], *, weights: list[float],
            nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True,
            task_vectors: bool = True) -> Tensor:
    """SLERP of the two models (or their task vectors) at t = w2/(w1 + w2), per tensor, row or
    column (§19.4). Paper box: reference.nuslerp."""
    if len(others) != 2:
        raise ValueError(f"nuslerp merges exactly 2 models, got {len(others)}")
    t = interpolation_factor(weights)
    x, y = (o - base for o in others) if task_vectors else others
    shape = (nuslerp_flatten, nuslerp_row_wise)
    out = from_vectors(slerp_rows(as_vectors(x, *shape), as_vectors(y, *shape), t), x, *shape)
    return out.add_(base) if task_vectors else out
