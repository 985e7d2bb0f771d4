"""SCE: select, calculate, erase (Wan et al. 2024, FuseChat, arXiv 2408.07990; mergekit's `sce`,
ALGORITHMS.md §19.7).

Per tensor, with δi = θi − θ0 for the N fine-tunes (no per-model weights):

    select (select_topk < 1): σ²_j = population variance of δ·j across the models;
        keep the K = floor(select_topk · #{σ² ≠ 0}) entries of largest σ² (lower flat index
        first among ties) in every δi, zero the rest (K = 0 or select_topk ≤ 0: all zero)
    calculate: ωi = mean_j δij², normalised to sum 1 (uniform 1/N when Σω < 1e-6)
    erase: s_j = +1 if Σi δij ≥ 0 else −1;  aij = [sign δij = s_j]
    out = θ0 + Σi ωi aij δij / max(Σi ωi aij, 1e-6)

Blocked: the deltas are recomputed per block of entries (`block_size`) in each of up to three
passes (variance, ω, output); the top-K is the exact threshold selection of primitives.py
(`largest_mask`, no sort). Besides its inputs it holds the output and, when select_topk < 1,
the variance and the keep mask (one byte an entry), plus N + 4 blocks. Every entry's result
has the dense form's bits except through ω: Σ δij² is summed in float32 per block and the
blocks in double, not as one float32 dot over the tensor, so its low bits (and the output's)
may differ.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from merging_methods.primitives import block_size, blocks, largest_mask

WEIGHT_SUM_EPS = 1e-6  # Σω below this: uniform weights
DIVISOR_EPS = 1e-6  # floor of the agreeing weight sum


def delta_blocks(base: Tensor, others: list[Tensor], keep: Tensor | None
                 ) -> Iterator[tuple[int, int, Tensor]]:
    """(start, stop, the (N, block) deltas there, zeroed outside `keep`), in flat order; the
    block buffer is reused."""
    flat, flats = base.reshape(-1), [other.reshape(-1) for other in others]
    size = min(block_size(base.device), max(flat.numel(), 1))
    buffer = flat.new_empty((len(others), size))
    for start, stop in blocks(flat.numel(), size):
        deltas = buffer[:, : stop - start]
        for row, other in zip(deltas, flats):
            torch.sub(other[start:stop], flat[start:stop], out=row)
        if keep is not None:
            deltas *= keep[start:stop]
        yield start, stop, deltas


def variance_topk_mask(base: Tensor, others: list[Tensor], select_topk: float) -> Tensor:
    """(n,) bool: the K entries of largest variance of the deltas across the models,
    K = floor(select_topk · count of non-zero variances); ties: lower index first."""
    variance = base.new_empty(base.numel())
    for start, stop, deltas in delta_blocks(base, others, None):
        torch.var(deltas, dim=0, unbiased=False, out=variance[start:stop])
    k = math.floor(select_topk * int(torch.count_nonzero(variance))) if select_topk > 0 else 0
    return largest_mask(variance, k)


def sce_weights(base: Tensor, others: list[Tensor], keep: Tensor | None) -> list[float]:
    """ωi = mean of the squared (selected) deltas, normalised to sum 1 (uniform when Σω is
    below WEIGHT_SUM_EPS)."""
    squares = [0.0] * len(others)
    for _, _, deltas in delta_blocks(base, others, keep):
        for i, delta in enumerate(deltas):
            squares[i] += float(torch.dot(delta, delta))
    weights = [square / max(base.numel(), 1) for square in squares]
    total = sum(weights)
    if abs(total) < WEIGHT_SUM_EPS:
        return [1.0 / len(others)] * len(others)
    return [weight / total for weight in weights]


def sce(base: Tensor, others: list[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """θ0 + the variance-selected, magnitude-weighted, sign-agreeing mean of the deltas (§19.7);
    float64 paper box: reference.sce."""
    keep = variance_topk_mask(base, others, select_topk) if select_topk < 1 else None
    weights = sce_weights(base, others, keep)
    flat = base.reshape(-1)
    out = flat.new_empty(flat.numel())
    for start, stop, deltas in delta_blocks(base, others, keep):
        sign = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)  # (block,)
        mixed, divisor = torch.zeros_like(sign), torch.zeros_like(sign)
        for weight, delta in zip(weights, deltas):
            agree = delta.sign() == sign  # a zero delta never agrees
            mixed += torch.where(agree, delta * weight, 0.0)
            divisor += torch.where(agree, weight, 0.0)
        torch.add(flat[start:stop], mixed / divisor.clamp_(min=DIVISOR_EPS), out=out[start:stop])
    return out.view_as(base)
