"""SLERP: spherical linear interpolation between two models (Shoemake 1985; used for LLM merging
by mergekit; ALGORITHMS.md §6, §19.3).

Per tensor, on the whole flattened tensor, with v0 = the base and v1 = the one other model:

    â = v0/‖v0‖ (v0 itself if ‖v0‖ ≤ 1e-8), b̂ likewise;  dot = clamp(Σ â·b̂, −1, 1)
    |dot| > 0.9995 (nearly colinear):  out = (1 − t)·v0 + t·v1
    otherwise, Ω = arccos(dot):        out = sin((1 − t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1

on the un-normalised tensors. t = 0 gives v0 and t = 1 gives v1 exactly; t outside [0, 1]
extrapolates (mergekit does not check it). The per-tensor-name filters and layer gradients of
`t` are resolved before the call: the function takes this tensor's scalar t.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

DOT_THRESHOLD = 0.9995  # above this |cos| the inputs count as colinear and are lerped
NORM_EPS = 1e-8  # a norm at or below this is not divided out (mergekit's eps)


def _norm_or_one(x: Tensor) -> float:
    norm = float(torch.linalg.vector_norm(x))
    return norm if norm > NORM_EPS else 1.0


def slerp(base: Tensor, others: list[Tensor], *, t: float) -> Tensor:
    """Spherical interpolation from the base (t = 0) to `others[0]` (t = 1), §6."""
    if len(others) != 1:
        raise ValueError(f"slerp merges the base with exactly 1 other model, got {len(others)}")
    v0, v1 = base.float(), others[0].float()
    dot = float(torch.dot(v0.reshape(-1), v1.reshape(-1))) / (_norm_or_one(v0) * _norm_or_one(v1))
    dot = min(max(dot, -1.0), 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return torch.lerp(v0, v1, t)  # exact at t = 0, t = 1 and for v0 == v1
    omega = math.acos(dot)
    c0, c1 = math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return torch.mul(v0, c0).add_(v1, alpha=c1)
