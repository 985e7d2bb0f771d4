"""Generalized task arithmetic (ALGORITHMS.md §0.6): linear, task_arithmetic, ties, dare_*.

Every method is one pure per-tensor function on float32 tensors of one shape and device:

    δi = θi − θ0;  ui = wi · ci · sparsify(δi)        (ci: the TIES/DARE rescale factor)
    no consensus:  out = θ0 + λ · Σ ui / D,            D = Σ wi if normalize (|D| < 1e-8 -> 1)
    sign consensus (TIES, Yadav et al. 2023, arXiv 2306.01708):
                   s = +1 where Σ ui ≥ 0 else −1;  ai = [sign(ui) = s]  (zeros never agree)
                   out = θ0 + λ · Σ ai ui / D,         D = Σ ai wi if normalize (0 -> 1)

DARE (Yu et al. 2023, arXiv 2311.03099) sparsifies at random; TIES keeps the exact top-k |δ|.
The work runs block by block (see primitives.py), accumulating into the output: no stack of N
deltas is ever built. Models with weight 0 contribute nothing and are skipped.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from checkpoints.errors import UserError
from merging_methods.primitives import (
    Deltas, PresetDrop, RandomDrop, TopK, block_size, blocks, l1_factor, topk_count,
)

SUM_EPS = 1e-8  # a weight sum closer to 0 than this is treated as 0 (§0.6 step 4, §1)
Sparsifier = TopK | RandomDrop | PresetDrop | None
Plan = Callable[[int, Deltas], tuple[Sparsifier, float]]  # model index -> (sparsifier, ci)


def _check_lengths(others: Sequence[Tensor], **per_model: Sequence) -> None:
    for name, values in per_model.items():
        if values is not None and len(values) != len(others):
            raise ValueError(f"{name}: {len(values)} values for {len(others)} models")


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


def _gta(base: Tensor, others: Sequence[Tensor], weights: Sequence[float], plan: Plan, *,
         consensus: bool, normalize: bool, scaling: float, out: Tensor | None) -> Tensor:
    """Run the §0.6 pipeline with `plan(i, deltas_i)` giving model i's sparsifier and factor ci."""
    _check_lengths(others, weights=weights)
    active = [i for i, w in enumerate(weights) if w != 0]
    if base.numel() == 0 or not active:
        return output_buffer(base, out).copy_(base.reshape(-1)).view_as(base)
    size = block_size(base.device)
    sources = [Deltas(base, others[i], size) for i in active]
    plans = [plan(i, source) for i, source in zip(active, sources)]
    sparsifiers, factors = [p[0] for p in plans], [p[1] for p in plans]
    kept = [weights[i] for i in active]
    if consensus:
        return _consensus_sum(base, sources, sparsifiers, kept, factors, normalize, scaling, out)
    total = sum(weights)
    divisor = total if normalize and abs(total) >= SUM_EPS else 1.0
    coeffs = [w * c * scaling / divisor for w, c in zip(kept, factors)]
    return _weighted_sum(base, sources, sparsifiers, coeffs, out)


def _no_sparsifier(i: int, deltas: Deltas) -> tuple[Sparsifier, float]:  # noqa: ARG001
    return None, 1.0


def _topk_plan(density: Sequence[float], rescale: bool) -> Plan:
    """Magnitude top-k per model; with `rescale`, match the untrimmed L1 norm (§3.2 step 2)."""
    def plan(i: int, deltas: Deltas) -> tuple[Sparsifier, float]:
        if topk_count(density[i], deltas.n) == deltas.n:
            return None, 1.0
        trim = TopK(deltas, density[i])
        return trim, l1_factor(deltas, trim) if rescale else 1.0
    return plan


def _dare_plan(density: Sequence[float], generators: list[torch.Generator] | None,
               rescale: bool, rescale_mode: str,
               keep_masks: Sequence[Tensor | None] | None = None) -> Plan:
    """Random Bernoulli(density) keep-mask per model, rescaled by 1/density or L1 (§4.2); the
    mask comes from `keep_masks[i]` when drawn ahead, else from `generators[i]`."""
    if rescale_mode not in ("inverse_density", "l1"):
        raise ValueError(f"rescale_mode: unknown mode {rescale_mode!r}")

    def plan(i: int, deltas: Deltas) -> tuple[Sparsifier, float]:
        p = density[i]
        if p >= 1.0:
            return None, 1.0
        if keep_masks is not None and keep_masks[i] is not None:
            drop = PresetDrop(keep_masks[i])
        elif generators is None:
            raise ValueError("DARE with density < 1 needs one generator per model")
        else:
            drop = RandomDrop(p, generators[i], min(deltas.size, deltas.n))
        if not rescale:
            return drop, 1.0
        if rescale_mode == "inverse_density":
            return drop, 1.0 / p
        factor = l1_factor(deltas, drop)
        drop.rewind()
        return drop, factor
    return plan


def linear(base: Tensor | None, others: list[Tensor], *, weights: Sequence[float],
           normalize: bool = True, generators: list[torch.Generator] | None = None,
           is_input_embedding: bool = False, out: Tensor | None = None) -> Tensor:
    """Σ wi·θi (/ Σ wi if normalize) over `others`; `base` is ignored (§1).

    Computed as c·θ1 + Σ_{i>1} (wi/D)(θi − θ1) with c = Σ wi/D, so that identical inputs come
    back exactly.
    """
    _check_lengths(others, weights=weights)
    total = sum(weights)
    if normalize and abs(total) < SUM_EPS:
        raise UserError("--weights: the weights sum to 0, so a normalized average is undefined; "
                        "change the weights or pass --no-normalize")
    divisor = total if normalize else 1.0
    anchor, rest = others[0], others[1:]
    size = block_size(anchor.device)
    coeffs = [w / divisor for w in weights[1:]]
    sources = [Deltas(anchor, other, size) for other in rest]
    return _weighted_sum(anchor, sources, [None] * len(rest), coeffs, out,
                         base_scale=total / divisor)


def task_arithmetic(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
                    scaling: float = 1.0, normalize: bool = False,
                    generators: list[torch.Generator] | None = None,
                    is_input_embedding: bool = False, out: Tensor | None = None) -> Tensor:
    """θ0 + λ·Σ wi·δi (/ Σ wi if normalize); a negative weight subtracts a task vector (§2)."""
    return _gta(base, others, weights, _no_sparsifier, consensus=False, normalize=normalize,
                scaling=scaling, out=out)


def ties(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
         density: Sequence[float], scaling: float = 1.0, normalize: bool = True,
         rescale: bool = False, generators: list[torch.Generator] | None = None,
         is_input_embedding: bool = False, out: Tensor | None = None) -> Tensor:
    """TIES (§3.2): trim each δi to its top-k |δi|, elect signs, merge the agreeing entries."""
    _check_lengths(others, density=density)
    return _gta(base, others, weights, _topk_plan(density, rescale), consensus=True,
                normalize=normalize, scaling=scaling, out=out)


def _dare_method(consensus: bool, doc: str) -> Callable[..., Tensor]:
    """dare_linear (no consensus) or dare_ties (sum-elected signs): one body, two methods."""
    def method(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
               density: Sequence[float], scaling: float = 1.0, normalize: bool = False,
               rescale: bool = True, rescale_mode: str = "inverse_density",
               generators: list[torch.Generator] | None = None,
               keep_masks: Sequence[Tensor | None] | None = None,
               is_input_embedding: bool = False, out: Tensor | None = None) -> Tensor:
        _check_lengths(others, density=density, generators=generators, keep_masks=keep_masks)
        return _gta(base, others, weights,
                    _dare_plan(density, generators, rescale, rescale_mode, keep_masks),
                    consensus=consensus, normalize=normalize, scaling=scaling, out=out)

    method.__doc__ = doc
    return method


dare_linear = _dare_method(
    False, "DARE + linear sum (§4.2): θ0 + λ·Σ wi·d̃i with d̃i the randomly dropped, rescaled δi.")
dare_ties = _dare_method(
    True, "DARE + TIES sign consensus (§4.2): θ0 + λ·Σ agreeing wi·d̃i (a disjoint sum by default).")
