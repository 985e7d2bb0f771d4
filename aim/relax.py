"""AIM relaxation math (ALGORITHMS.md §12.1), pure: no I/O, no devices chosen, float32 results.

For a weight with input-channel statistic S (aim/collect.py) and the base and merged tensors:

    a_c = |S_c| / max_c' |S_c'|              importance in [0, 1]; the busiest channel has a = 1
    r_c = 1 - a_c * (1 - omega)              relaxation factor per input channel
    W   = W_base + (W_merged - W_base) * r   r broadcast along the weight's input-feature axis

omega = 1 leaves the merged model unchanged; omega = 0 gives the base weights on the most
important channel and keeps the full merged delta on channels the base barely uses. A module with
max S = 0 is not relaxed (the reference divides by zero). omega outside [0, 1] is allowed with a
warning (> 1 amplifies the delta, < 0 overshoots past the base).

Modes (`mode=`), the controls of issue 6:
* `aim`: the per-channel factors above.
* `channel_blind`: each module's importance vector is replaced by its mean, so every channel of a
  module gets the module's mean AIM factor (same average strength, no per-channel information).
* `uniform`: one global factor for every relaxed weight element, equal to the mean AIM factor over
  all relaxed weight elements (a column's factor counts once per row of its weight).
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import torch

log = logging.getLogger(__name__)

MODES = ("aim", "channel_blind", "uniform")


def importance(stat: torch.Tensor) -> torch.Tensor | None:
    """|S| / max|S| in float32, or None when max|S| = 0 (the module is then not relaxed)."""
    magnitude = stat.detach().abs().to(torch.float32)
    top = magnitude.max()
    if not torch.isfinite(top):
        raise ValueError("statistic contains inf or NaN; recalibrate in float32")
    return None if top <= 0 else magnitude / top


def aim_factors(a: torch.Tensor, omega: float) -> torch.Tensor:
    """r = 1 - a (1 - omega) for importance `a`."""
    return 1.0 - a * (1.0 - omega)


def relaxation_factors(stats: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]],
                       axes: Mapping[str, int], omega: float, mode: str = "aim") -> dict[str, torch.Tensor]:
    """Factor vector r (float32, one value per input channel) for each weight, under `mode`.

    `shapes` and `axes` give each weight's shape and input-feature axis. Weights whose statistic is
    all zero get no entry (leave them as merged).
    """
    if mode not in MODES:
        raise ValueError(f"unknown AIM mode {mode!r}; choose one of {', '.join(MODES)}")
    if not 0.0 <= omega <= 1.0:
        log.warning("omega %s is outside [0, 1]: %s", omega,
                    "the merged delta is amplified" if omega > 1 else "weights overshoot past the base")
    factors: dict[str, torch.Tensor] = {}
    for name, stat in stats.items():
        a = importance(stat)
        if a is None:
            continue
        width = shapes[name][axes[name]]
        if a.numel() != width:
            raise ValueError(f"{name}: statistic has {a.numel()} channels, weight {tuple(shapes[name])} "
                             f"has {width} on axis {axes[name]}")
        if mode == "channel_blind":
            a = a.mean().expand(width)
        factors[name] = aim_factors(a, omega)
    if mode == "uniform" and factors:
        level = _element_weighted_mean(factors, shapes)
        factors = {name: torch.full_like(r, level) for name, r in factors.items()}
    return factors


def _element_weighted_mean(factors: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> float:
    """Mean factor over all weight elements: each channel counts numel / channels times."""
    total = weighted = 0.0
    for name, r in factors.items():
        numel = math.prod(shapes[name])
        weighted += r.double().sum().item() * (numel / r.numel())
        total += numel
    return weighted / total


def relax(merged: torch.Tensor, base: torch.Tensor, factor: torch.Tensor, axis: int) -> torch.Tensor:
    """base + (merged - base) * r, with r broadcast along `axis` of the weight; float32."""
    if merged.shape != base.shape:
        raise ValueError(f"merged {tuple(merged.shape)} and base {tuple(base.shape)} differ in shape")
    if factor.numel() != merged.shape[axis]:
        raise ValueError(f"{factor.numel()} factors for axis {axis} of a {tuple(merged.shape)} weight")
    view = [1] * merged.ndim
    view[axis] = -1
    r = factor.to(device=merged.device, dtype=torch.float32).view(view)
    # lerp computes base + r (merged - base) two-sided, so r = 1 gives `merged` and r = 0 gives
    # `base` bit-exactly (omega = 1 is the identity; omega = 0 restores the top channel).
    return torch.lerp(base.to(torch.float32), merged.to(torch.float32), r.expand_as(merged))
