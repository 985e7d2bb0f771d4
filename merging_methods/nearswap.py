"""NearSwap (mergekit's `nearswap`, Arcee; ALGORITHMS.md §19.8).

Per entry, with θ0 the base and θ1 the one other model:

    w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1);   out = w·θ1 + (1 − w)·θ0

i.e. (for t ≥ 1e-6) out = θ0 + clip(θ1 − θ0, −t, t): each entry moves toward the other model by
at most t, so entries closer than t are taken from θ1; t ≤ 0 gives the base. Per element: the
runner merges it in row chunks (blockwise.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

DIST_EPS = 1e-6  # floor of |θ0 − θ1| in the weight's denominator


def nearswap(base: Tensor, others: list[Tensor], *, t: float) -> Tensor:
    """Move each entry of the base toward `others[0]` by at most t (§19.8); float64 paper box:
    reference.nearswap."""
    if len(others) != 1:
        raise ValueError(f"nearswap merges the base with exactly 1 other model, got {len(others)}")
    other = others[0]
    distance = torch.sub(base, other).abs_().clamp_(min=DIST_EPS)
    weight = torch.full_like(distance, t).div_(distance).clamp_(0.0, 1.0)
    return torch.lerp(base, other, weight)  # exactly θ0 where w = 0 and θ1 where w = 1
