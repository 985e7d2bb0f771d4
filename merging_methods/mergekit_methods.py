"""The YAML parameters of every method merge.py reads from mergekit configs (ALGORITHMS.md §19.2).

mergekit's names and 0.1.5's defaults, plus the names our method functions take. This is the one
place to update when the registry's `Param` declarations carry their YAML key: derive these
tables from them then.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

REQUIRED = object()  # a parameter without default: mergekit errors when no scope sets it


@dataclass(frozen=True)
class MethodParams:
    """The YAML parameters of one method (mergekit names) with 0.1.5's defaults (§19.2).

    A default of None means "unset" (passthrough's `scale`). `uses_base`: the base is the
    origin of the deltas; False: it is an ordinary input with its own per-model values.
    `others`: allowed number of non-base inputs per slice (max None = no limit).
    """

    per_model: Mapping[str, object]
    shared: Mapping[str, object]
    uses_base: bool = True
    others: tuple[int, int | None] = (0, None)


def _gta(normalize: bool, rescale: bool, **per_model: float) -> MethodParams:
    return MethodParams({"weight": REQUIRED, "density": 1.0, **per_model},
                        {"normalize": normalize, "rescale": rescale, "lambda": 1.0,
                         "int8_mask": False})


METHODS: dict[str, MethodParams] = {
    "linear": MethodParams({"weight": REQUIRED}, {"normalize": True}, uses_base=False,
                           others=(1, None)),
    "task_arithmetic": _gta(False, False),
    "ties": _gta(True, False),
    "dare_linear": _gta(False, True),
    "dare_ties": _gta(False, True),
    "breadcrumbs": _gta(False, False, gamma=0.01),
    "breadcrumbs_ties": _gta(False, False, gamma=0.01),
    "della": _gta(True, True, epsilon=0.15),
    "della_linear": _gta(False, True, epsilon=0.15),
    "slerp": MethodParams({}, {"t": REQUIRED}, others=(1, 1)),
    "passthrough": MethodParams({"scale": None}, {}, uses_base=False, others=(1, 1)),
    "model_stock": MethodParams({}, {"filter_wise": False}, others=(2, None)),
    "fr_merging": MethodParams({"weight": REQUIRED},
                               {"lambda": 1.0, "normalize": False, "fr_faithful": False}),
    "widen": MethodParams({}, {"above_average_value_ratio": 1.0, "score_calibration_value": 1.0},
                          others=(1, None)),
}
ALIASES = {"fourier": "fr_merging"}
NOT_FROM_YAML = {  # method -> why `merge_method:` refuses it
    **dict.fromkeys(("nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram",
                     "ramplus_tl"), "a mergekit method this toolkit does not implement"),
    **dict.fromkeys(("free_merging", "free"), "it needs a task model; use merge.py's flags"),
}
BOOL_PARAMS = frozenset({"normalize", "rescale", "int8_mask", "filter_wise", "fr_faithful"})

INTERNAL_NAMES = {"weight": "weights", "lambda": "scaling"}
"""YAML parameter -> our method's keyword, where they differ."""
NO_EFFECT = {**{method: ("int8_mask",) for method in METHODS},  # a mergekit memory option
             "task_arithmetic": ("int8_mask", "density", "rescale")}  # declared, no sparsifier
"""Parameters mergekit accepts that change nothing in our method: read, never passed on."""
FIXED_INTERNAL = {"dare_linear": {"rescale_mode": "l1"}, "dare_ties": {"rescale_mode": "l1"}}
"""Keywords a YAML merge implies: mergekit 0.1.5's DARE rescale is L1-norm matching (§19.3)."""
