"""Generalized task arithmetic (ALGORITHMS.md §0.6): linear, task_arithmetic, ties, dare_*.

    δi = θi − θ0;  ui = wi · ci · sparsify(δi)        (ci: the TIES/DARE rescale factor)
    no consensus:  out = θ0 + λ · Σ ui / D,            D = Σ wi if normalize (|D| < 1e-8 -> 1)
    sign consensus (TIES, Yadav et al. 2023, arXiv 2306.01708):
                   s = +1 where Σ ui ≥ 0 else −1;  ai = [sign(ui) = s]  (zeros never agree)
                   out = θ0 + λ · Σ ai ui / D,         D = Σ ai wi if normalize (0 -> 1)

DARE (Yu et al. 2023, arXiv 2311.03099) sparsifies at random; TIES keeps the exact top-k |δ|.
These are the methods as the runner calls them by default: whole float32 tensors in, a new
float32 tensor out. `reference.py` holds the same formulas in float64 (the paper box);
`gta_blocked.py` computes these very bits block by block in reused buffers (the fast path), so
the float32 operations below are written in its order. Models with weight 0 are skipped.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import Tensor

from merging_methods.primitives import blocked_l1, keep_mask, keep_topk, l1_ratio, used_density

SUM_EPS = 1e-8  # a weight sum closer to 0 than this is treated as 0 (§0.6 step 4, §1)


def check_lengths(others: Sequence[Tensor], **per_model: Sequence | None) -> None:
    """A ValueError when a per-model argument does not hold one value per model."""
    for name, values in per_model.items():
        if values is not None and len(values) != len(others):
            raise ValueError(f"{name}: {len(values)} values for {len(others)} models")


def _weighted_sum(start: Tensor, deltas: list[Tensor], coeffs: list[float]) -> Tensor:
    """start + Σ coeff_i · δi, one float32 add per model."""
    out = start.clone()
    for delta, coeff in zip(deltas, coeffs):
        out.add_(delta, alpha=coeff)
    return out


def _consensus_sum(base: Tensor, deltas: list[Tensor], weights: list[float],
                   factors: list[float], normalize: bool, scaling: float) -> Tensor:
    """θ0 + λ · Σ ai ui (/ Σ ai wi), with ui = wi·ci·δi and the sum-elected sign s."""
    coeffs = [w * c for w, c in zip(weights, factors)]
    total = torch.mul(deltas[0], coeffs[0])
    for delta, coeff in zip(deltas[1:], coeffs[1:]):
        total.add_(torch.mul(delta, coeff))  # each ui rounded first: a fused add would turn an
        #                                      exact 0 sum (elects +1) into ±tiny
    sign = torch.where(total >= 0, 1.0, -1.0)
    merged, divisor = torch.zeros_like(base), torch.zeros_like(base)
    for delta, weight, coeff in zip(deltas, weights, coeffs):
        along = delta * sign  # s·δi has the sign of wi exactly where sign(ui) = s (ci > 0)
        agreeing = along.clamp(min=0) if weight > 0 else along.clamp(max=0)
        merged.add_(agreeing, alpha=coeff)  # Σ ai · ui · s
        divisor.add_(agreeing.sign(), alpha=abs(weight))  # Σ ai · wi
    merged.mul_(sign)
    if normalize:
        merged.div_(divisor + (divisor == 0))  # a zero divisor becomes 1
    return torch.add(base, merged, alpha=scaling)


def _gta(base: Tensor, deltas: dict[int, Tensor], factors: dict[int, float],
         weights: Sequence[float], *, consensus: bool, normalize: bool,
         scaling: float) -> Tensor:
    """The §0.6 sum over the active models' sparsified deltas (keyed by model index)."""
    if not deltas:
        return base.clone()
    active = sorted(deltas)
    kept, ds, cs = [weights[i] for i in active], [deltas[i] for i in active], [factors[i] for i in active]
    if consensus:
        return _consensus_sum(base, ds, kept, cs, normalize, scaling)
    total = sum(weights)
    divisor = total if normalize and abs(total) >= SUM_EPS else 1.0
    return _weighted_sum(base, ds, [w * c * scaling / divisor for w, c in zip(kept, cs)])


def _active(base: Tensor, weights: Sequence[float]) -> list[int]:
    return [i for i, w in enumerate(weights) if w != 0] if base.numel() else []


def linear(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
           normalize: bool = True) -> Tensor:
    """Σ wi·θi (/ Σ wi if normalize) over `others`; `base` is ignored (§1).

    Computed as c·θ1 + Σ_{i>1} (wi/D)(θi − θ1) with c = Σ wi/D, so that identical inputs come
    back exactly. Paper box: reference.linear.
    """
    check_lengths(others, weights=weights)
    total = sum(weights)
    if normalize and abs(total) < SUM_EPS:
        raise ValueError("weights: they sum to 0, so a normalized average is undefined")
    divisor = total if normalize else 1.0
    anchor = others[0]
    return _weighted_sum(anchor * (total / divisor), [o - anchor for o in others[1:]],
                         [w / divisor for w in weights[1:]])


def task_arithmetic(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
                    scaling: float = 1.0, normalize: bool = False) -> Tensor:
    """θ0 + λ·Σ wi·δi (/ Σ wi if normalize); a negative weight subtracts a task vector (§2).
    Paper box: reference.task_arithmetic."""
    check_lengths(others, weights=weights)
    active = _active(base, weights)
    return _gta(base, {i: others[i] - base for i in active}, dict.fromkeys(active, 1.0), weights,
                consensus=False, normalize=normalize, scaling=scaling)


def trim_topk(delta: Tensor, density: float, at_least_one: bool = False) -> Tensor:
    """δ with all but its exact top-k |δ| zeroed, k = floor(density·n) (`at_least_one`: at
    least 1), ties to the lower flat index (§0.5)."""
    return torch.where(keep_topk(delta, density, at_least_one=at_least_one), delta, 0.0)


def ties(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
         density: Sequence[float], scaling: float = 1.0, normalize: bool = True,
         rescale: bool = False, mergekit_trim: bool = False) -> Tensor:
    """TIES (§3.2): trim each δi to its top-k |δi| (with `rescale`, back to the untrimmed L1
    norm; `mergekit_trim`: keep at least one entry, §19.3), elect signs, merge the agreeing
    entries. Paper box: reference.ties."""
    check_lengths(others, weights=weights, density=density)
    deltas, factors = {}, {}
    for i in _active(base, weights):
        delta = others[i] - base
        deltas[i] = trim_topk(delta, density[i], mergekit_trim)
        factors[i] = l1_ratio(blocked_l1(delta), blocked_l1(deltas[i])) if rescale else 1.0
    return _gta(base, deltas, factors, weights, consensus=True, normalize=normalize,
                scaling=scaling)


def drop_random(delta: Tensor, density: float, key: int) -> Tensor:
    """δ with each entry kept where its mask-rule-2 draw (primitives.keep_mask, §4.2) is below
    the density; drawn on δ's device, the same bits on any device."""
    return delta * keep_mask(key, density, 0, delta.numel(), delta.device).view_as(delta)


def dare(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
         density: Sequence[float], mask_keys: Sequence[int], consensus: bool,
         scaling: float = 1.0, normalize: bool = False, rescale: bool = True,
         rescale_mode: str = "inverse_density") -> Tensor:
    """DARE (§4.2): each δi randomly dropped (Bernoulli keep-mask of the density quantised to
    1/65536, mask rule 2), rescaled by 1/(that density) or to its L1 norm, then summed
    (dare_linear) or merged with TIES sign consensus (dare_ties, a disjoint sum by default).
    Paper box: reference.dare."""
    check_lengths(others, weights=weights, density=density, mask_keys=mask_keys)
    if rescale_mode not in ("inverse_density", "l1"):
        raise ValueError(f"rescale_mode: unknown mode {rescale_mode!r}")
    deltas, factors = {}, {}
    for i in _active(base, weights):
        delta, p = others[i] - base, used_density(density[i])
        deltas[i], factors[i] = delta, 1.0
        if p < 1.0:
            deltas[i] = drop_random(delta, p, mask_keys[i])
            if rescale:
                factors[i] = (1.0 / p if rescale_mode == "inverse_density"
                              else l1_ratio(blocked_l1(delta), blocked_l1(deltas[i])))
    return _gta(base, deltas, factors, weights, consensus=consensus, normalize=normalize,
                scaling=scaling)


dare_linear = partial(dare, consensus=False)
dare_ties = partial(dare, consensus=True)
