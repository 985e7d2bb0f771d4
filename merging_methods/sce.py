"""SCE: select, calculate, erase (Wan et al. 2024, FuseChat, arXiv 2408.07990; mergekit's `sce`,
ALGORITHMS.md §19.7).

Per tensor, with δi = θi − θ0 for the N fine-tunes (no per-model weights):

    select (select_topk < 1): σ²_j = population variance of δ·j across the models;
        keep the K = floor(select_topk · #{σ² ≠ 0}) entries of largest σ² (lower flat index
        first among ties) in every δi, zero the rest (K = 0 or select_topk ≤ 0: all zero)
    calculate: ωi = mean_j δij², normalised to sum 1 (uniform 1/N when Σω < 1e-6)
    erase: s_j = +1 if Σi δij ≥ 0 else −1;  aij = [sign δij = s_j]
    out = θ0 + Σi ωi aij δij / max(Σi ωi aij, 1e-6)

Dense: besides its inputs it holds the N deltas and up to about six more float32 copies of
the tensor (the variance and the sort's values and int64 indices when select_topk < 1; then
the elected signs, the sums and their temporaries).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

WEIGHT_SUM_EPS = 1e-6  # Σω below this: uniform weights
DIVISOR_EPS = 1e-6  # floor of the agreeing weight sum


def variance_topk_mask(deltas: Tensor, select_topk: float) -> Tensor:
    """(n,) bool: the K entries of largest variance across the models of `deltas` (N, n),
    K = floor(select_topk · count of non-zero variances); ties: lower index first."""
    variance = deltas.var(dim=0, unbiased=False)  # (n,)
    k = math.floor(select_topk * int(torch.count_nonzero(variance))) if select_topk > 0 else 0
    keep = torch.zeros_like(variance, dtype=torch.bool)
    keep[torch.sort(variance, descending=True, stable=True).indices[:k]] = True
    return keep


def sce(base: Tensor, others: list[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """θ0 + the variance-selected, magnitude-weighted, sign-agreeing mean of the deltas (§19.7);
    float64 paper box: reference.sce."""
    flat = base.reshape(-1)
    deltas = flat.new_empty((len(others), flat.numel()))  # (N, n)
    for row, other in zip(deltas, others):
        torch.sub(other.reshape(-1), flat, out=row)
    if select_topk < 1:
        deltas *= variance_topk_mask(deltas, select_topk)
    weights = torch.stack([torch.dot(delta, delta) for delta in deltas]) / flat.numel()  # (N,)
    total = weights.sum()
    weights = weights / total if abs(float(total)) >= WEIGHT_SUM_EPS else \
        torch.full_like(weights, 1.0 / len(others))
    sign = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)  # (n,)
    mixed, divisor = torch.zeros_like(sign), torch.zeros_like(sign)
    for weight, delta in zip(weights.tolist(), deltas):
        agree = delta.sign() == sign  # a zero delta never agrees
        mixed += torch.where(agree, delta * weight, 0.0)
        divisor += torch.where(agree, weight, 0.0)
    return base + (mixed / divisor.clamp_(min=DIVISOR_EPS)).view_as(base)
