"""Model Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795; ALGORITHMS.md §9, §19.3).

Per task vector, drop both the smallest entries and the largest outliers, then merge as GTA
(§0.6). With n entries, `density` p and `gamma` g (both per model):

    target = ⌊p·n⌋,  n_top = ⌊g·n⌋,  n_bot = n − target − n_top  (if n_bot < 0: n_top += n_bot, n_bot = 0)
    keep the entries at positions n_bot … n − n_top − 1 of the stable ascending order of |δi|
    breadcrumbs:       out = θ0 + λ·Σ wi·δ̃i            (/ Σ wi if normalize)
    breadcrumbs_ties:  out = θ0 + λ·Σ_agree wi·δ̃i      (/ Σ_agree wi if normalize)

Exactly `target` entries are kept. This is the intended range (and mergekit 0.1.5's), not the
git snapshot's `[n_bot:-n_top]` slice that keeps nothing when n_top = 0. With `rescale` the
kept entries are scaled to the L1 norm of δi (as TIES, §3.2 step 2).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from merging_methods.gta import check_lengths
from merging_methods.gta_blocked import Plan, Sparsifier, blocked_gta
from merging_methods.primitives import (
    MATCH_L1, Deltas, MatchL1, PresetDrop, TieRun, abs_blocks_of, abs_rank_band, dense_delta,
    plan_topk,
)


def keep_range(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, n − n_top): the kept positions of the ascending |δ| order (§9)."""
    target, n_top = math.floor(density * n), math.floor(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    return n_bot, n - n_top


class RankBand:
    """The §9 trim as a blocked sparsifier: keep the entries at positions start..stop-1 of the
    stable ascending order of |δ|, the mask `abs_rank_band` gives, without the whole tensor.

    The first `count` positions are every |δ| below the exact threshold of the n - count largest
    (§0.5) plus the first of its ties in flat order; blocks must be applied in flat order
    (TieRun), as for TopK.
    """

    def __init__(self, deltas: Deltas, start: int, stop: int):
        self._scratch = deltas.new_buffer()
        sample = deltas.sample().abs_()
        self.bounds = [self._prefix(deltas, count, sample) for count in (start, stop)]

    def _prefix(self, deltas: Deltas, count: int, sample: Tensor) -> TieRun | bool:
        """The first `count` positions: a TieRun at their threshold, or True (all) / False
        (none)."""
        n = deltas.n
        if count <= 0 or count >= n:
            return count > 0
        cut = plan_topk(abs_blocks_of(deltas), n, n - count, self._scratch, sample)
        # the n - count largest hold the *last* keep_equal ties: the first ones are the prefix's
        return TieRun(cut.value, cut.equal - cut.keep_equal, cut.equal, n)

    def _in_prefix(self, bound: TieRun | bool, delta: Tensor, magnitude: Tensor,
                   start: int) -> Tensor:
        if isinstance(bound, bool):
            return torch.full_like(magnitude, bound, dtype=torch.bool)
        inside = magnitude < bound.value
        cut = bound.cut(delta, start, self._scratch)
        inside[:cut] |= magnitude[:cut] == bound.value
        return inside

    def apply_(self, delta: Tensor, start: int) -> Tensor:
        """Zero, in place, the entries of this block (flat offset `start`) outside the band."""
        magnitude = delta.abs()
        low, high = (self._in_prefix(b, delta, magnitude, start) for b in self.bounds)
        return delta.mul_(high & ~low)


def _dense_band(deltas: Deltas, start: int, stop: int) -> PresetDrop:
    return PresetDrop(abs_rank_band(dense_delta(deltas), start, stop))


def _outlier_plan(density: Sequence[float], gamma: Sequence[float], rescale: bool,
                  band: Callable[[Deltas, int, int], Sparsifier] = _dense_band) -> Plan:
    """Keep the §9 band of model i's |δ| (`band`: the whole-tensor mask, or RankBand); with
    `rescale`, match the untrimmed L1 norm."""
    def plan(i: int, deltas: Deltas) -> tuple[Sparsifier, float | MatchL1]:
        start, stop = keep_range(deltas.n, density[i], gamma[i])
        if (start, stop) == (0, deltas.n):
            return None, 1.0
        trim = band(deltas, start, stop)
        return trim, MATCH_L1 if rescale else 1.0
    return plan


def _breadcrumbs_method(consensus: bool) -> Callable[..., Tensor]:
    """breadcrumbs (plain sum) or breadcrumbs_ties (sum-elected signs): one body, two methods."""
    def method(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
               density: Sequence[float], gamma: Sequence[float], scaling: float = 1.0,
               normalize: bool = False, rescale: bool = False) -> Tensor:
        """Breadcrumbs (§9): θ0 + λ·Σ wi·δ̃i (breadcrumbs_ties: over the sign-agreeing models),
        δ̃i = δi without its smallest and its largest |δ|."""
        check_lengths(others, density=density, gamma=gamma)
        plan = _outlier_plan(density, gamma, rescale)
        return blocked_gta(base, others, weights, plan, consensus=consensus, normalize=normalize,
                    scaling=scaling, out=None)
    return method


breadcrumbs, breadcrumbs_ties = _breadcrumbs_method(False), _breadcrumbs_method(True)


def band_plan(*, density: Sequence[float], gamma: Sequence[float], rescale: bool, **_) -> Plan:
    """The two-pass form's plan (streamed.py): RankBand over the streamed delta."""
    return _outlier_plan(density, gamma, rescale, RankBand)
