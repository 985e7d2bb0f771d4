"""The fast path of gta.py: the same methods, block by block in reused buffers (optional).

Each function here returns the bits of its namesake in gta.py (tests/test_methods.py checks
that on float32 and bfloat16 inputs) while never building a full-size temporary: deltas are
formed a block of `block_size(device)` elements at a time (see primitives.py), accumulated into
`out` (a result buffer the runner reuses from tensor to tensor), and no stack of N deltas is
ever built. Inputs may stay in their stored dtype (bf16/fp16; the upcast of a block is exact).
DARE draws its keep-masks from `mask_keys` block by block (mask rule 2, primitives.py), or takes
`keep_masks` drawn ahead by the runner.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from merging_methods.gta import SUM_EPS, check_lengths
from merging_methods.half_spectrum import FilteredRows
from merging_methods.primitives import (
    MATCH_L1, REMEMBERED_MASK_ELEMENTS, Deltas, MatchL1, PresetDrop, RandomDrop, TopK,
    Upcast, block_size, blocks, l1_factors, topk_count, used_density,
)

Sparsifier = TopK | RandomDrop | PresetDrop | FilteredRows | None
# model index, its deltas -> (sparsifier, ci), ci given as MATCH_L1 when it is the L1 ratio
Plan = Callable[[int, Deltas], tuple[Sparsifier, float | MatchL1]]


def output_buffer(like: Tensor, out: Tensor | None) -> Tensor:
    """Flat float32 view of `out` (a reusable result buffer shaped like the inputs), or a fresh
    float32 tensor (inputs may be stored bf16/fp16; results are float32).

    Reusing one buffer avoids page-faulting fresh memory for every tensor. `out` must not
    overlap any input.
    """
    if out is None:
        return torch.empty(like.numel(), dtype=torch.float32, device=like.device)
    if (out.shape != like.shape or out.dtype != torch.float32 or out.device != like.device
            or not out.is_contiguous()):
        raise ValueError(f"out: expected contiguous {tuple(like.shape)} float32 on "
                         f"{like.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out.view(-1)


def _weighted_sum(base: Tensor, sources: list[Deltas], sparsifiers: list[Sparsifier],
                  coeffs: list[float], out: Tensor | None, base_scale: float = 1.0) -> Tensor:
    """base_scale·θ0 + Σ coeff_i · sparsify(δi), one block at a time."""
    flat = base.reshape(-1)
    out = output_buffer(base, out)
    for start, stop in blocks(flat.numel(), block_size(base.device)):
        acc = out[start:stop]
        if base_scale == 1.0:
            acc.copy_(flat[start:stop])
        else:
            torch.mul(flat[start:stop], base_scale, out=acc)
        for source, sparsifier, coeff in zip(sources, sparsifiers, coeffs):
            delta = source.block(start, stop)
            if sparsifier is not None:
                sparsifier.apply_(delta, start)
            acc.add_(delta, alpha=coeff)
    return out.view_as(base)


def _consensus_sum(base: Tensor, sources: list[Deltas], sparsifiers: list[Sparsifier],
                   weights: list[float], factors: list[float], normalize: bool, scaling: float,
                   out: Tensor | None) -> Tensor:
    """θ0 + λ · Σ ai ui (/ Σ ai wi), with ui = wi·ci·sparse(δi) and the sum-elected sign."""
    flat = base.reshape(-1)
    out = output_buffer(base, out)
    size = min(block_size(base.device), flat.numel())
    elected = torch.empty(size, dtype=torch.float32, device=flat.device)
    product = torch.empty_like(elected)
    divisor = torch.empty_like(elected) if normalize else None
    coeffs = [w * c for w, c in zip(weights, factors)]
    for start, stop in blocks(flat.numel(), size):
        deltas = []
        for source, sparsifier in zip(sources, sparsifiers):
            delta = source.block(start, stop)
            deltas.append(sparsifier.apply_(delta, start) if sparsifier is not None else delta)
        sign = elected[: stop - start]
        torch.mul(deltas[0], coeffs[0], out=sign)
        for delta, coeff in zip(deltas[1:], coeffs[1:]):
            # each ui rounded to float32 before it is added: add_(alpha=) may fuse the multiply
            # and add, and a sum that is exactly 0 (elects +1) would come out as ±tiny
            sign.add_(torch.mul(delta, coeff, out=product[: stop - start]))
        sign.ge_(0).mul_(2).sub_(1)  # +1 where Σ ui >= 0 (a zero sum elects +1), else -1
        acc = out[start:stop].zero_()
        div = divisor[: stop - start].zero_() if divisor is not None else None
        for delta, weight, coeff in zip(deltas, weights, coeffs):
            delta.mul_(sign)  # s·δi: sign(ui) = s  <=>  s·δi has the sign of wi (ci > 0)
            if weight > 0:
                delta.clamp_(min=0)
            else:
                delta.clamp_(max=0)
            acc.add_(delta, alpha=coeff)  # Σ ai · ui · s
            if div is not None:
                div.add_(delta.sign_(), alpha=abs(weight))  # Σ ai · wi
        acc.mul_(sign)
        if div is not None:
            div.add_(torch.eq(div, 0, out=sign))  # a zero divisor becomes 1
            acc.div_(div)
        torch.add(flat[start:stop], acc, alpha=scaling, out=acc)
    return out.view_as(base)


def blocked_gta(base: Tensor, others: Sequence[Tensor], weights: Sequence[float], plan: Plan, *,
         consensus: bool, normalize: bool, scaling: float, out: Tensor | None) -> Tensor:
    """Run the §0.6 pipeline with `plan(i, deltas_i)` giving model i's sparsifier and factor ci."""
    check_lengths(others, weights=weights)
    active = [i for i, w in enumerate(weights) if w != 0]
    if base.numel() == 0 or not active:
        return output_buffer(base, out).copy_(base.reshape(-1)).view_as(base)
    size = block_size(base.device)
    upcast = Upcast(min(size, base.numel()), base.device)   # the base's blocks, shared
    sources = [Deltas(base, others[i], size, upcast) for i in active]
    plans = planned(plan, active, sources)
    sparsifiers, factors = [p[0] for p in plans], [p[1] for p in plans]
    kept = [weights[i] for i in active]
    if consensus:
        return _consensus_sum(base, sources, sparsifiers, kept, factors, normalize, scaling, out)
    total = sum(weights)
    divisor = total if normalize and abs(total) >= SUM_EPS else 1.0
    coeffs = [w * c * scaling / divisor for w, c in zip(kept, factors)]
    return _weighted_sum(base, sources, sparsifiers, coeffs, out)


def planned(plan: Plan, models: Sequence[int], sources: Sequence[Deltas]
            ) -> list[tuple[Sparsifier, float]]:
    """Each model's (sparsifier, factor) from `plan`; the MATCH_L1 factors are found together
    in one pass over the models' blocks (l1_factors)."""
    plans = [plan(i, source) for i, source in zip(models, sources)]
    pending = [j for j, (_, factor) in enumerate(plans) if factor is MATCH_L1]
    ratios = l1_factors([sources[j] for j in pending], [plans[j][0] for j in pending])
    for j, ratio in zip(pending, ratios):
        plans[j] = plans[j][0], ratio
    return plans


def _no_sparsifier(i: int, deltas: Deltas) -> tuple[Sparsifier, float]:  # noqa: ARG001
    return None, 1.0


def _topk_plan(density: Sequence[float], rescale: bool, at_least_one: bool) -> Plan:
    """Magnitude top-k per model; with `rescale`, match the untrimmed L1 norm (§3.2 step 2)."""
    def plan(i: int, deltas: Deltas) -> tuple[Sparsifier, float | MatchL1]:
        if topk_count(density[i], deltas.n, at_least_one) == deltas.n:
            return None, 1.0
        trim = TopK(deltas, density[i], at_least_one)
        return trim, MATCH_L1 if rescale else 1.0
    return plan


def _dare_plan(density: Sequence[float], mask_keys: Sequence[int] | None,
               rescale: bool, rescale_mode: str,
               keep_masks: Sequence[Tensor | None] | None = None, mask_offset: int = 0) -> Plan:
    """Random keep-mask per model (mask rule 2), rescaled by 1/(the quantised density) or L1
    (§4.2); the mask comes from `keep_masks[i]` when drawn ahead, else from `mask_keys[i]`, for
    the entries from flat index `mask_offset` on (a row chunk's masks are its tensor's)."""
    if rescale_mode not in ("inverse_density", "l1"):
        raise ValueError(f"rescale_mode: unknown mode {rescale_mode!r}")
    l1 = rescale and rescale_mode == "l1"

    def plan(i: int, deltas: Deltas) -> tuple[Sparsifier, float | MatchL1]:
        p = used_density(density[i])
        if p >= 1.0:
            return None, 1.0
        if keep_masks is not None and keep_masks[i] is not None:
            drop = PresetDrop(keep_masks[i])
        elif mask_keys is None:
            raise ValueError("DARE with density < 1 needs one mask key per model")
        else:   # the L1 factor's pass and the merge use the same masks: drawn once
            remember = l1 and deltas.n <= REMEMBERED_MASK_ELEMENTS
            drop = RandomDrop(p, mask_keys[i], deltas.n if remember else None, mask_offset)
        if not rescale:
            return drop, 1.0
        return drop, MATCH_L1 if l1 else 1.0 / p
    return plan


def ties_plan(*, density: Sequence[float], rescale: bool, mergekit_trim: bool = False,
              **_) -> Plan:
    """TIES's plan from its resolved parameters (the two-pass form, streamed.py)."""
    return _topk_plan(density, rescale, mergekit_trim)


def dare_plan(*, density: Sequence[float], mask_keys: Sequence[int], rescale: bool,
              rescale_mode: str, **_) -> Plan:
    """DARE's plan from its resolved parameters and mask keys (the two-pass form, streamed.py)."""
    return _dare_plan(density, mask_keys, rescale, rescale_mode)


def linear(base: Tensor | None, others: list[Tensor], *, weights: Sequence[float],
           normalize: bool = True, out: Tensor | None = None) -> Tensor:
    """Σ wi·θi (/ Σ wi if normalize) over `others`; `base` is ignored (§1).

    Computed as c·θ1 + Σ_{i>1} (wi/D)(θi − θ1) with c = Σ wi/D, so that identical inputs come
    back exactly.
    """
    check_lengths(others, weights=weights)
    total = sum(weights)
    if normalize and abs(total) < SUM_EPS:
        raise ValueError("weights: they sum to 0, so a normalized average is undefined")
    divisor = total if normalize else 1.0
    anchor, rest = others[0], others[1:]
    size = block_size(anchor.device)
    coeffs = [w / divisor for w in weights[1:]]
    upcast = Upcast(min(size, anchor.numel()), anchor.device)
    sources = [Deltas(anchor, other, size, upcast) for other in rest]
    return _weighted_sum(anchor, sources, [None] * len(rest), coeffs, out,
                         base_scale=total / divisor)


def task_arithmetic(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
                    scaling: float = 1.0, normalize: bool = False,
                    out: Tensor | None = None) -> Tensor:
    """θ0 + λ·Σ wi·δi (/ Σ wi if normalize); a negative weight subtracts a task vector (§2)."""
    return blocked_gta(base, others, weights, _no_sparsifier, consensus=False, normalize=normalize,
                scaling=scaling, out=out)


def ties(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
         density: Sequence[float], scaling: float = 1.0, normalize: bool = True,
         rescale: bool = False, mergekit_trim: bool = False,
         out: Tensor | None = None) -> Tensor:
    """TIES (§3.2): trim each δi to its top-k |δi|, elect signs, merge the agreeing entries."""
    check_lengths(others, density=density)
    return blocked_gta(base, others, weights, _topk_plan(density, rescale, mergekit_trim),
                       consensus=True, normalize=normalize, scaling=scaling, out=out)


def _dare_method(consensus: bool, doc: str) -> Callable[..., Tensor]:
    """dare_linear (no consensus) or dare_ties (sum-elected signs): one body, two methods."""
    def method(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
               density: Sequence[float], scaling: float = 1.0, normalize: bool = False,
               rescale: bool = True, rescale_mode: str = "inverse_density",
               mask_keys: Sequence[int] | None = None,
               keep_masks: Sequence[Tensor | None] | None = None, mask_offset: int = 0,
               out: Tensor | None = None) -> Tensor:
        check_lengths(others, density=density, mask_keys=mask_keys, keep_masks=keep_masks)
        plan = _dare_plan(density, mask_keys, rescale, rescale_mode, keep_masks, mask_offset)
        return blocked_gta(base, others, weights, plan, consensus=consensus,
                           normalize=normalize, scaling=scaling, out=out)

    method.__doc__ = doc
    return method


dare_linear = _dare_method(
    False, "DARE + linear sum (§4.2): θ0 + λ·Σ wi·d̃i with d̃i the randomly dropped, rescaled δi.")
dare_ties = _dare_method(
    True, "DARE + TIES sign consensus (§4.2): θ0 + λ·Σ agreeing wi·d̃i (a disjoint sum by default).")
