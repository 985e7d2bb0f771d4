"""FR-Merging: Fourier-filtered task vectors (Zheng & Wang, "FREE-Merging: Fourier Transform for
Model Merging with Lightweight Experts", arXiv 2411.16815; ALGORITHMS.md §10). Alias `fourier`.

Each 2-D task vector δ [H, W] goes through a 2-D FFT filter; other tensors are not filtered:

    F = FFT2(δ)  (unshifted: (0, 0) is the DC term)
    d(u, v) = √((u − ⌊H/2⌋)² + (v − ⌊W/2⌋)²)   the distance from the Nyquist point
    r_hi = ratio·min(H, W),  r_lo = ⌊min(H, W)/10⌋
    K = [d ≤ r_hi]    (fr_faithful: the reference's [d ≤ r_lo] + [r_lo ≤ d ≤ r_hi], which
                       counts the ring d = r_lo twice)
    δ' = Re(IFFT2(F ⊙ K))

Far from the Nyquist point lie the corners of the unshifted spectrum, the lowest spatial
frequencies: a high-pass filter. On a square matrix the farthest bin is at ≈ 0.71·N, so ratio
0.9 keeps everything. The filtered deltas are merged with the sum sign consensus (§10.3):

    out = θ0 + λ·Σ_agree wi·δi'     (/ Σ_agree wi if normalize; normalize false by default)

Memory: the 2-D FFT needs the whole δ of a matrix, so this method has no two-pass form (issue
14 §2) and holds whole tensors, the models in float32 plus complex64 spectra: peak RSS 3.8 GB
merging three models of the 542M bench family (largest matrix 32000 x 2048), growing with
the largest matrix.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from merging_methods.gta_blocked import Plan, Sparsifier, blocked_gta
from merging_methods.primitives import Deltas, PresetDelta, dense_delta

FR_RATIO = 0.9  # the reference's hard-coded ratio for LLMs (0.7 in its ViT config)


def fr_keep_mask(height: int, width: int, ratio: float = FR_RATIO, faithful: bool = False,
                 device: torch.device | str = "cpu") -> Tensor:
    """The filter K as a float32 [H, W] multiplier: 1 kept, 0 removed (2 on the faithful ring)."""
    short = min(height, width)
    r_hi2, r_lo2 = (ratio * short) ** 2, (short // 10) ** 2
    du2 = (torch.arange(height, dtype=torch.float64, device=device) - height // 2).square()[:, None]  # (H, 1)
    dv2 = (torch.arange(width, dtype=torch.float64, device=device) - width // 2).square()[None, :]  # (1, W)
    # d² ≤ r² as dv² ≤ r² − du²: exact integers in float64, and no [H, W] float64 temporary
    high = dv2 <= r_hi2 - du2  # (H, W)
    if not faithful:
        return high.float()
    low = dv2 <= r_lo2 - du2
    return low.float() + (high & (dv2 >= r_lo2 - du2)).float()


def fr_filter(delta: Tensor, ratio: float = FR_RATIO, faithful: bool = False) -> Tensor:
    """δ' = Re(IFFT2(FFT2(δ) ⊙ K)) for a 2-D float32 δ (§10.2)."""
    mask = fr_keep_mask(*delta.shape, ratio=ratio, faithful=faithful, device=delta.device)
    # a contiguous copy: the .real view would keep the complex result alive
    return torch.fft.ifft2(torch.fft.fft2(delta).mul_(mask)).real.contiguous()


def _filter_plan(shape: torch.Size, ratio: float, faithful: bool) -> Plan:
    """Replace every 2-D δi by its filtered version; other tensors pass unchanged."""
    def plan(i: int, deltas: Deltas) -> tuple[Sparsifier, float]:  # noqa: ARG001
        if len(shape) != 2:
            return None, 1.0
        return PresetDelta(fr_filter(dense_delta(deltas).view(shape), ratio, faithful)), 1.0
    return plan


def fr_merging(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
               scaling: float = 1.0, normalize: bool = False, fr_ratio: float = FR_RATIO,
               fr_faithful: bool = False) -> Tensor:
    """FR-Merging (§10.3): filter each 2-D δi, then θ0 + λ·Σ agreeing wi·δi'."""
    return blocked_gta(base, others, weights, _filter_plan(base.shape, fr_ratio, fr_faithful),
                consensus=True, normalize=normalize, scaling=scaling, out=None)
