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

from checkpoints.rows import row_ranges, rows_of
from merging_methods.streamed import RowSource, TwoPass

DOT_THRESHOLD = 0.9995  # above this |cos| the inputs count as colinear and are lerped
NORM_EPS = 1e-8  # a norm at or below this is not divided out (mergekit's eps)
Sums = tuple[float, float, float]  # (v0·v1, ‖v0‖², ‖v1‖²)


def chunk_sums(base: Tensor, other: Tensor) -> Sums:
    """(v0·v1, ‖v0‖², ‖v1‖²) of one row chunk: float32 dots, returned as Python floats."""
    v0, v1 = base.float().reshape(-1), other.float().reshape(-1)
    return float(torch.dot(v0, v1)), float(torch.dot(v0, v0)), float(torch.dot(v1, v1))


def add_sums(total: Sums, part: Sums) -> Sums:
    """The sums of two chunks, in double (the chunks' order fixes the bits)."""
    return tuple(a + b for a, b in zip(total, part))


def _norm_or_one(square: float) -> float:
    norm = math.sqrt(square)
    return norm if norm > NORM_EPS else 1.0


def interpolate(sums: Sums, base: Tensor, other: Tensor, t: float,
                out: Tensor | None = None) -> Tensor:
    """The §6 formula on (rows of) v0 = base and v1 = other, given the whole tensor's sums;
    into `out` (float32, base's shape) when given: v0 is upcast into it, so that a chunk
    makes one float32 temporary (v1) instead of three (same operations, same bits)."""
    v0 = base.float() if out is None else out.copy_(base)
    v1 = other.float()
    dot = sums[0] / (_norm_or_one(sums[1]) * _norm_or_one(sums[2]))
    dot = min(max(dot, -1.0), 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return torch.lerp(v0, v1, t, out=out)  # exact at t = 0, t = 1 and for v0 == v1
    omega = math.acos(dot)
    c0, c1 = math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return torch.mul(v0, c0, out=out).add_(v1, alpha=c1)


def slerp(base: Tensor, others: list[Tensor], *, t: float) -> Tensor:
    """Spherical interpolation from the base (t = 0) to `others[0]` (t = 1), §6. The dots are
    summed over the row chunks the runner streams (rows.row_ranges), so that the two-pass form
    gets the same bits."""
    if len(others) != 1:
        raise ValueError(f"slerp merges the base with exactly 1 other model, got {len(others)}")
    sums: Sums = (0.0, 0.0, 0.0)
    for rows in row_ranges(base.shape, split=True):
        sums = add_sums(sums, chunk_sums(rows_of(base, rows), rows_of(others[0], rows)))
    return interpolate(sums, base, others[0], t)


def _stats(source: RowSource, **_) -> Sums:
    sums: Sums = (0.0, 0.0, 0.0)
    for rows in source.chunks:
        sums = add_sums(sums, chunk_sums(*source.read(rows, 0)))
    return sums


def _apply(sums: Sums, offset: int, base: Tensor, others: list[Tensor], *, t: float,  # noqa: ARG001
           out: Tensor | None = None, **_) -> Tensor:
    return interpolate(sums, base, others[0], t, out)


# the dots from the streamed chunks, then the rows; not ahead of the merge: three dot products
# per chunk are cheap, and gathered beside the merge they kept another chunk set live (peak RSS
# 0.44-0.52 GiB against 0.39-0.45 in line, six runs each on the 542M family, same speed)
SLERP_TWO_PASS = TwoPass(_stats, _apply, ahead=0)
