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

Computed as a separable real FFT (half_spectrum.py): the half spectrum of each δ, row group by
row group, then column strip by column strip, with the filter made Hermitian, K_sym(u, v) =
(K(u, v) + K(−u, −v))/2, which gives Re(IFFT2(F ⊙ K)) exactly in math (float rounding apart:
within 1.2e-6 of the complex FFT2 path on N(0, 1) deltas of up to 512 x 256). δ' is inverted a
row group at a time as the merge's blocks pass (half_spectrum.FilteredRows).

Memory: streams (issue 14 §2). A matrix above 2M entries (streamed.HOLD_ONE_CHUNK) goes in two
passes: each active model's half spectrum is built and filtered in an unnamed scratch file in
the staging folder (H x (W//2 + 1) complex64: 0.26 GB for 32000 x 2048), then the chunks are
merged one by one; the same bits as the whole-tensor path. A smaller tensor is merged whole, its
models' half spectra in memory. Peak RSS merging three models of the 542M bench family:
0.37-0.38 GiB (3.46 GB with whole complex FFT2s), flat as the largest matrix grows.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from merging_methods.gta_blocked import Plan, Sparsifier, blocked_gta
from merging_methods.half_spectrum import (
    FileStore, FilteredRows, HalfSpectrum, MemoryStore, Rows, Store, Strip, chunk_groups,
    filtered_spectrum, row_groups,
)
from merging_methods.primitives import Deltas
from merging_methods.streamed import HOLD_ONE_CHUNK, RowSource, TwoPass

FR_RATIO = 0.9  # the reference's hard-coded ratio for LLMs (0.7 in its ViT config)


def _nyquist_distance2(index: Tensor, size: int) -> Tensor:
    """(index − ⌊size/2⌋)² in float64 (exact integers)."""
    return (index.to(torch.float64) - size // 2).square()


def _keep(du2: Tensor, dv2: Tensor, short: int, ratio: float, faithful: bool) -> Tensor:
    """K as float32 from the squared distances du² (H', 1) and dv² (1, W') to the Nyquist point."""
    r_hi2, r_lo2 = (ratio * short) ** 2, (short // 10) ** 2
    # d² ≤ r² as dv² ≤ r² − du²: exact integers in float64, and no [H, W] float64 temporary
    high = dv2 <= r_hi2 - du2  # (H', W')
    if not faithful:
        return high.float()
    low = dv2 <= r_lo2 - du2
    return low.float() + (high & (dv2 >= r_lo2 - du2)).float()


def fr_keep_mask(height: int, width: int, ratio: float = FR_RATIO, faithful: bool = False,
                 device: torch.device | str = "cpu") -> Tensor:
    """The filter K as a float32 [H, W] multiplier: 1 kept, 0 removed (2 on the faithful ring)."""
    u = torch.arange(height, device=device)
    v = torch.arange(width, device=device)
    return _keep(_nyquist_distance2(u, height)[:, None], _nyquist_distance2(v, width)[None, :],
                 min(height, width), ratio, faithful)


def half_keep_mask(height: int, width: int, strip: Strip, ratio: float = FR_RATIO,
                   faithful: bool = False, device: torch.device | str = "cpu") -> Tensor:
    """K_sym(u, v) = (K(u, v) + K(−u mod H, −v mod W)) / 2 on the columns `strip` of the half
    spectrum, float32 [H, columns]: the Hermitian part of K, which the real FFT applies."""
    u = torch.arange(height, device=device)
    v = torch.arange(*strip, device=device)
    short = min(height, width)
    direct = _keep(_nyquist_distance2(u, height)[:, None], _nyquist_distance2(v, width)[None, :],
                   short, ratio, faithful)
    mirror = _keep(_nyquist_distance2(-u % height, height)[:, None],
                   _nyquist_distance2(-v % width, width)[None, :], short, ratio, faithful)
    return direct.add_(mirror).mul_(0.5)


def _spectrum(shape: tuple[int, int], read: Rows, store: Store, ratio: float, faithful: bool,
              device: torch.device) -> HalfSpectrum:
    """The filtered half spectrum of the δ whose rows `read(rows)` gives (base, model)."""
    def keep(strip: Strip) -> Tensor:
        return half_keep_mask(*shape, strip, ratio, faithful, device)
    return filtered_spectrum(shape, read, store, keep)


def fr_spectrum(base: Tensor, other: Tensor, ratio: float = FR_RATIO,
                faithful: bool = False) -> HalfSpectrum:
    """The filtered half spectrum, in memory, of the 2-D δ = other − base, by the real
    separable FFT over the row chunks and column strips the two-pass form uses (same bits)."""
    shape = tuple(base.shape)
    store = MemoryStore(shape[0] * (shape[1] // 2 + 1), base.device)
    return _spectrum(shape, lambda rows: (base[rows[0]:rows[1]], other[rows[0]:rows[1]]), store,
                     ratio, faithful, base.device)


def fr_filter(delta: Tensor, ratio: float = FR_RATIO, faithful: bool = False) -> Tensor:
    """δ' = Re(IFFT2(FFT2(δ) ⊙ K)) for a 2-D float32 δ (§10.2)."""
    spectrum = fr_spectrum(torch.zeros_like(delta), delta, ratio, faithful)
    return torch.cat([spectrum.rows(group) for group in chunk_groups(tuple(delta.shape))])


def _filter_plan(shape: torch.Size, ratio: float, faithful: bool) -> Plan:
    """Replace every 2-D δi by its filtered version; other tensors pass unchanged."""
    def plan(i: int, deltas: Deltas) -> tuple[Sparsifier, float]:  # noqa: ARG001
        if len(shape) != 2:
            return None, 1.0
        spectrum = fr_spectrum(deltas.base.view(shape), deltas.other.view(shape), ratio, faithful)
        return FilteredRows(spectrum, chunk_groups(tuple(shape))), 1.0
    return plan


def fr_merging(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
               scaling: float = 1.0, normalize: bool = False, fr_ratio: float = FR_RATIO,
               fr_faithful: bool = False, out: Tensor | None = None) -> Tensor:
    """FR-Merging (§10.3): filter each 2-D δi, then θ0 + λ·Σ agreeing wi·δi'. Inputs may be
    stored bf16/fp16; `out`: an optional float32 result buffer (registry.FastPath)."""
    return blocked_gta(base, others, weights, _filter_plan(base.shape, fr_ratio, fr_faithful),
                consensus=True, normalize=normalize, scaling=scaling, out=out)


Spectra = dict[int, HalfSpectrum]   # active model -> its filtered half spectrum (2-D only)


def _stats(source: RowSource, *, weights: Sequence[float], fr_ratio: float = FR_RATIO,
           fr_faithful: bool = False, **_) -> Spectra:
    """Each active model's filtered half spectrum, built from the streamed chunks in a scratch
    file (an unfiltered tensor, not 2-D, has none)."""
    if len(source.shape) != 2:
        return {}

    def spectrum(i: int) -> HalfSpectrum:
        return _spectrum(source.shape, lambda rows: source.read(rows, i),
                         FileStore(source.scratch, source.device), fr_ratio, fr_faithful,
                         source.device)
    return {i: spectrum(i) for i, w in enumerate(weights) if w != 0}


def _apply(spectra: Spectra, offset: int, base: Tensor, others: list[Tensor], *,
           weights: Sequence[float], normalize: bool = False, scaling: float = 1.0,
           out: Tensor | None = None, **_) -> Tensor:
    """The chunk at flat offset `offset` merged from the models' filtered rows; the scratch
    files are removed after the last chunk."""
    first = offset // math.prod(base.shape[1:])
    rows = (first, first + base.shape[0])

    def plan(i: int, _deltas: Deltas) -> tuple[Sparsifier, float]:
        if not spectra:
            return None, 1.0
        return FilteredRows(spectra[i], row_groups(rows, spectra[i].width)), 1.0
    merged = blocked_gta(base, others, weights, plan, consensus=True, normalize=normalize,
                         scaling=scaling, out=out)
    for spectrum in spectra.values():
        if rows[1] == spectrum.height:
            spectrum.close()
    return merged


# filtered spectra in scratch files, then the chunks; above one chunk: held whole, the 2048 x 2048
# matrices' in-memory spectra took peak RSS on the 542M family to 0.46-0.49 GiB (free_merging;
# fr_merging 0.43-0.47), streamed 0.37-0.38 GiB for both, in about the same time (3 interleaved
# runs: free_merging 33.9 s against 37.6, fr_merging 35.7 against 34.1)
FR_TWO_PASS = TwoPass(_stats, _apply, hold_elements=HOLD_ONE_CHUNK)
