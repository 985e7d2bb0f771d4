"""The study's grid, pure: which merges run, under which labels, and which AIM variants follow.

A merge is one method on a 2- or 3-expert combination of the toy zoo in one weight regime.
Regimes only exist for methods whose result scales with the per-expert weight (task
arithmetic, DARE-linear, DARE-TIES: weight 1.0 is the AIM paper's setting, a smaller weight is
the tuned setting); TIES averages the agreeing deltas and WIDEN takes no weights, so each has
one row per combination. Labels follow the paper's `TIES_InstructMathCode` style and end in
`_aim<omega>`, `_blind<omega>` or `_uniform<omega>` for AIM and its two controls (names only:
`evaluation.report` pairs runs through their folders' merge records).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from aim.relax import MODES
from merging_methods.recipe import MergeRecipe
from merging_methods.registry import get_method

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "widen")
SKILLS = ("instruct", "math", "code")
MODE_TAGS = {"aim": "aim", "channel_blind": "blind", "uniform": "uniform"}


def weight_matters(method: str) -> bool:
    """True when a uniform per-expert weight changes the merge (weights used, no normalisation)."""
    spec = get_method(method)
    return "weights" in spec.params and not spec.defaults.get("normalize", False)


@dataclass(frozen=True)
class MergeJob:
    """One merge of the grid (weight None: the method has no weight regime)."""

    method: str
    experts: tuple[str, ...]
    weight: float | None = None
    density: float | None = None
    seed: int = 0              # the random masks' seed (DARE); other methods ignore it

    @property
    def label(self) -> str:
        regime = "" if self.weight is None else f"_w{self.weight:g}"
        seed = f"_s{self.seed}" if self.seed else ""
        return f"{self.method}{regime}_{''.join(s.capitalize() for s in self.experts)}{seed}"

    def recipe(self, zoo: str, save_path: str) -> MergeRecipe:
        """The merge recipe of this job on the zoo in folder `zoo`."""
        params = {name: value for name, value in (("weights", self.weight), ("density", self.density))
                  if value is not None}
        return MergeRecipe(method=self.method, base_model=f"{zoo}/base",
                           models=tuple(f"{zoo}/expert_{s}" for s in self.experts),
                           save_path=save_path, params=params, seed=self.seed, overwrite=True)


@dataclass(frozen=True)
class Variant:
    """An AIM relaxation of a merge: mode (aim or a control) at one omega."""

    mode: str
    omega: float

    def label(self, merge_label: str) -> str:
        return f"{merge_label}_{MODE_TAGS[self.mode]}{self.omega:g}"


def combinations(skills: tuple[str, ...] = SKILLS, sizes: tuple[int, ...] = (2, 3)) -> list[tuple[str, ...]]:
    """Every combination of `skills` of each size, in a fixed order."""
    return [c for n in sizes for c in itertools.combinations(skills, n)]


def merge_jobs(methods: tuple[str, ...], combos: list[tuple[str, ...]], weights: tuple[float, ...],
               density: float | None, seeds: tuple[int, ...] = (0,),
               seed_sizes: tuple[int, ...] | None = None) -> list[MergeJob]:
    """The grid: per method, per weight (when it matters), per combination, and per seed for
    the methods with random masks (DARE); with `seed_sizes`, only merges of that many experts
    get every seed, the others the first.

    `density` goes to the methods that take one (TIES and DARE), None leaves their default.
    """
    jobs = []
    for method in methods:
        spec = get_method(method)
        for weight in (weights if weight_matters(method) else (None,)):
            for combo in combos:
                every_seed = seed_sizes is None or len(combo) in seed_sizes
                for seed in ((seeds if every_seed else seeds[:1]) if spec.stochastic else (0,)):
                    jobs.append(MergeJob(method, tuple(combo), weight,
                                         density if "density" in spec.params else None, seed))
    return jobs


def variants(omega: float, sweep: tuple[float, ...], modes: tuple[str, ...], full: bool) -> list[Variant]:
    """AIM at `omega` for every merge; with `full`, every mode at every sweep omega as well."""
    if not full:
        return [Variant("aim", omega)]
    omegas = sorted(set(sweep) | {omega})
    return [Variant(m, w) for m in modes for w in omegas]


def study_plan(methods: tuple[str, ...], weights: tuple[float, ...], density: float | None,
               omega: float, sweep: tuple[float, ...], sweep_sizes: tuple[int, ...],
               combos: list[tuple[str, ...]], only_swept: bool = False,
               seeds: tuple[int, ...] = (0,),
               sweep_methods: tuple[str, ...] | None = None,
               seed_sizes: tuple[int, ...] | None = None) -> list[tuple[MergeJob, list[Variant]]]:
    """Every merge with its variants: AIM at `omega`, plus all modes x `sweep` for merges of
    `sweep_sizes` experts (and of `sweep_methods`, when given). `only_swept` keeps just those merges (the outlier zoo's ablation)."""
    plan = []
    for job in merge_jobs(methods, combos, weights, density, seeds, seed_sizes):
        full = len(job.experts) in sweep_sizes and (sweep_methods is None or job.method in sweep_methods)
        if full or not only_swept:
            plan.append((job, variants(omega, sweep, MODES, full)))
    return plan
