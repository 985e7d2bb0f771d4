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

import torch
from torch import Tensor

COS_EPS = 1e-6  # floor of the cosine denominators
DENOM_EPS = 1e-6  # |1 + (N − 1)·c| below this gives t = 0 (the base)


def model_stock(base: Tensor, others: list[Tensor], *, filter_wise: bool = False) -> Tensor:
    """t·mean(θi) + (1 − t)·θ0 with t from the mean pairwise cosine of the task vectors (§8)."""
    n = len(others)
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {n}")
    if base.numel() == 0:
        return base.float().clone()
    width = base.shape[-1] if filter_wise and base.dim() >= 2 else base.numel()
    base_rows = base.float().reshape(-1, width)  # (R, C): one row unless filter_wise
    rows = [other.float().reshape(-1, width) for other in others]
    offsets = [row - base_rows for row in rows]
    norms = [torch.linalg.vector_norm(o, dim=1) for o in offsets]  # (R,) each
    cosines = [((offsets[i] * offsets[j]).sum(1) / (norms[i] * norms[j]).clamp(min=COS_EPS))
               .clamp(-1.0, 1.0) for i, j in itertools.combinations(range(n), 2)]
    c = torch.stack(cosines).mean(0)  # (R,)
    denom = 1 + (n - 1) * c
    flat = denom.abs() < DENOM_EPS
    t = torch.where(flat, 0.0, n * c / torch.where(flat, 1.0, denom))[:, None]  # (R, 1)
    mean = torch.stack(rows).mean(0)  # (R, C)
    return (t * mean + (1 - t) * base_rows).view(base.shape)
