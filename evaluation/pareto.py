"""Hypervolume (HV) of benchmark scores, and the HV gain of a merged model over its population.

Definition used in the report (copy of this text is in the README):

* Axes. Each benchmark b is one axis. The population P is the set of models the merge was made
  from (base and experts). Over P, lo_b = min score and hi_b = max score.
* Normalisation. A score s becomes u = (s - lo_b) / (hi_b - lo_b) when higher is better, and
  u = (hi_b - s) / (hi_b - lo_b) when lower is better (perplexity). So on every axis larger is
  better, the population's worst model sits at 0 and its best at 1. Merged models can fall
  outside [0, 1]. If hi_b == lo_b, the denominator is 1 (plain shift).
* Reference point r = (-m, ..., -m) with margin m = 0 by default: the population's worst score
  on every benchmark. `--hv_margin m` moves it m population ranges further out, so merges a
  little worse than every population model on one axis (typically perplexity) still count.
* HV(S) = the volume of the union over u in S of the boxes [r, u]. A point at or below the
  reference on any axis adds nothing. Computed exactly by slicing (small sets, any dimension).
* HV of a merged model m: HV(P ∪ {m}). HV gain: HV(P ∪ {m}) - HV(P), the volume m dominates
  that no population model does (0 when m is dominated by P).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Axis:
    """How one benchmark's raw score maps onto the normalised, larger-is-better axis."""

    name: str
    lo: float
    hi: float
    higher_is_better: bool = True

    def normalise(self, score: float) -> float:
        span = (self.hi - self.lo) or 1.0
        return (score - self.lo) / span if self.higher_is_better else (self.hi - score) / span


def population_axes(population: Sequence[Mapping[str, float]], benchmarks: Sequence[str],
                    higher_is_better: Mapping[str, bool]) -> list[Axis]:
    """One Axis per benchmark, spanning the population's min..max score."""
    return [Axis(b, min(p[b] for p in population), max(p[b] for p in population),
                 higher_is_better.get(b, True)) for b in benchmarks]


def normalise(scores: Mapping[str, float], axes: Sequence[Axis]) -> tuple[float, ...]:
    """A model's scores as a point in the normalised space (one coordinate per axis)."""
    return tuple(axis.normalise(scores[axis.name]) for axis in axes)


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Exact volume dominated by `points` (maximisation) above the reference point `ref`."""
    ref = tuple(float(r) for r in ref)
    kept = [tuple(map(float, p)) for p in points if all(x > r for x, r in zip(p, ref))]
    return _slice_volume(kept, ref)


def _slice_volume(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Sweep the last axis from the top: each slab's volume is its height x the (d-1)-D HV."""
    if not points:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in points) - ref[0]
    points = sorted(points, key=lambda p: p[-1], reverse=True)
    volume = 0.0
    for i, point in enumerate(points):
        floor = points[i + 1][-1] if i + 1 < len(points) else ref[-1]
        if point[-1] > floor:  # slab [floor, point[-1]] is covered by points[: i + 1]
            section = [p[:-1] for p in points[: i + 1]]
            volume += (point[-1] - floor) * _slice_volume(section, ref[:-1])
    return volume


HV_NOISE = 1e-12


def hv_gain(point: Sequence[float], population: Sequence[Sequence[float]],
            margin: float = 0.0) -> tuple[float, float]:
    """(HV(P ∪ {point}), HV(P ∪ {point}) - HV(P)) with the reference at (-margin, ..., -margin).

    A gain below HV_NOISE is float rounding of two equal volumes and is reported as 0 (else a
    -1e-19 gain reads as a +1e15 % change in the report)."""
    ref = (-margin,) * len(point)
    with_point = hypervolume(list(population) + [point], ref)
    gain = with_point - hypervolume(population, ref)
    return with_point, 0.0 if abs(gain) < HV_NOISE else gain


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated 2-D points (maximisation on both axes), sorted by the first coordinate."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))
