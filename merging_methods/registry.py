"""The table of merge methods: name -> function, accepted parameters and mergekit defaults.

Defaults follow ALGORITHMS.md §0.6, §1, §3.1, §4.1 and §5.1. Per-model parameters (`weights`,
`density`) reach the functions as one value per model; the rest are global.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import Tensor

from checkpoints.errors import UserError
from merging_methods.gta import SUM_EPS, dare_linear, dare_ties, linear, task_arithmetic, ties
from merging_methods.widen import widen

PER_MODEL = frozenset({"weights", "density"})
RESCALE_MODES = ("inverse_density", "l1")
FLAGS = {  # parameter -> the flag users type, for error messages
    "weights": "--weights", "density": "--density", "scaling": "--lambda",
    "normalize": "--normalize", "rescale": "--rescale", "rescale_mode": "--rescale_mode",
    "above_average_value_ratio": "--above_average_value_ratio",
    "score_calibration_value": "--score_calibration_value",
}


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: `fn(base, others, **params, generators=..., is_input_embedding=...)`."""

    fn: Callable[..., Tensor]
    params: frozenset[str]
    defaults: Mapping[str, object]
    stochastic: bool = False  # needs one generator per model (mask_generator)
    needs_base: bool = True  # False: the base only supplies config and tokenizer
    # True: `base` and `others` may arrive in their stored dtype (bf16/fp16); the method only
    # reads them through float32 blocks (exact upcast), so the runner skips full float32 copies.
    stored_dtype_inputs: bool = False
    # True: the formula is per element, so a block of rows merged alone gives those rows of the
    # whole-tensor result (the runner then merges large tensors in row chunks; see rows.py).
    row_separable: bool = False
    summary: str = ""
    name: str = field(default="", compare=False)


def _spec(name: str, fn: Callable[..., Tensor], defaults: dict[str, object], summary: str,
          **flags: bool) -> MethodSpec:
    return MethodSpec(fn, frozenset(defaults), defaults, summary=summary, name=name, **flags)


_GTA = {"weights": 1.0, "scaling": 1.0}
_DARE = {**_GTA, "density": 1.0, "normalize": False, "rescale": True,
         "rescale_mode": "inverse_density"}
METHODS: dict[str, MethodSpec] = {
    "linear": _spec("linear", linear, {"weights": 1.0, "normalize": True},
                    "weighted average of the models (the base is not averaged in)",
                    needs_base=False, row_separable=True),
    "task_arithmetic": _spec("task_arithmetic", task_arithmetic, {**_GTA, "normalize": False},
                             "base + lambda * sum of weighted task vectors",
                             stored_dtype_inputs=True, row_separable=True),
    "ties": _spec("ties", ties, {**_GTA, "density": 1.0, "normalize": True, "rescale": False},
                  "trim to top-|delta|, elect signs, average the agreeing deltas",
                  stored_dtype_inputs=True),
    "dare_linear": _spec("dare_linear", dare_linear, _DARE,
                         "random drop + rescale, then task arithmetic", stochastic=True,
                         stored_dtype_inputs=True, row_separable=True),
    "dare_ties": _spec("dare_ties", dare_ties, _DARE,
                       "random drop + rescale, then TIES sign consensus", stochastic=True,
                       stored_dtype_inputs=True, row_separable=True),
    "widen": _spec("widen", widen, {"above_average_value_ratio": 1.0,
                                    "score_calibration_value": 1.0},
                   "per-column magnitude/direction ranking of task vectors (WIDEN)"),
}


def get_method(name: str) -> MethodSpec:
    """The spec of method `name`; an unknown name is a UserError listing the choices."""
    if name not in METHODS:
        raise UserError(f"--method: unknown method {name!r}; "
                        f"choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def splits_by_rows(spec: MethodSpec, params: Mapping[str, object]) -> bool:
    """Whether a tensor may be merged in row chunks with these parameters: a per-element method,
    except DARE's l1 rescale, whose factor is a norm over the whole tensor."""
    values = {**spec.defaults, **params}
    whole_tensor_norm = values.get("rescale") is True and values.get("rescale_mode") == "l1"
    return spec.row_separable and not whole_tensor_norm


def _per_model(name: str, value: object, n_models: int) -> list[object]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, n_models):
        raise UserError(f"{FLAGS[name]}: {len(values)} values for {n_models} models; "
                        "give one value or one per model")
    return values * (n_models if len(values) == 1 else 1)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{FLAGS[name]}: expected a finite number, got {value!r}")
    return float(value)


def validate_params(spec: MethodSpec, params: Mapping[str, object], n_models: int) -> None:
    """Raise a UserError naming the flag for any parameter `spec.fn` would reject or misuse."""
    unknown = sorted(set(params) - spec.params)
    if unknown:
        raise UserError(f"{FLAGS.get(unknown[0], unknown[0])}: not a parameter of --method "
                        f"{spec.name}; it takes {', '.join(FLAGS[p] for p in sorted(spec.params))}")
    values = {**spec.defaults, **params}
    per_model = {name: [_finite(name, v) for v in _per_model(name, values[name], n_models)]
                 for name in sorted(PER_MODEL & spec.params)}
    for v in per_model.get("density", []):
        if not 0.0 < v <= 1.0:
            raise UserError(f"--density: {v} is outside (0, 1]; density is the fraction of each "
                            "task vector kept (1 keeps everything)")
    for name in ("normalize", "rescale"):
        if name in spec.params and not isinstance(values[name], bool):
            raise UserError(f"{FLAGS[name]}: expected true or false, got {values[name]!r}")
    if "rescale_mode" in spec.params and values["rescale_mode"] not in RESCALE_MODES:
        raise UserError(f"--rescale_mode: expected one of {', '.join(RESCALE_MODES)}, "
                        f"got {values['rescale_mode']!r}")
    if "scaling" in spec.params:
        _finite("scaling", values["scaling"])
    if "above_average_value_ratio" in spec.params:
        if not _finite("above_average_value_ratio", values["above_average_value_ratio"]) > 0:
            raise UserError("--above_average_value_ratio: must be > 0")
    if "score_calibration_value" in spec.params:
        if not _finite("score_calibration_value", values["score_calibration_value"]) >= 0:
            raise UserError("--score_calibration_value: must be >= 0")
    if spec.name == "linear" and values["normalize"]:
        if abs(sum(per_model["weights"])) < SUM_EPS:
            raise UserError("--weights: the weights sum to 0, so a normalized average is "
                            "undefined; change the weights or pass --no-normalize")


def method_warnings(spec: MethodSpec, params: Mapping[str, object]) -> list[str]:
    """Warnings for the runner to log once: settings that are valid but likely not meant."""
    values = {**spec.defaults, **params}
    weights = values.get("weights", 1.0)
    weights = list(weights) if isinstance(weights, (list, tuple)) else [weights]
    if spec.name == "linear" or not values.get("normalize") or min(weights) >= 0:
        return []
    if spec.name in ("ties", "dare_ties"):
        return [f"{spec.name}: a negative --weights value with --normalize cancels out (each "
                "position divides by the sum of the agreeing weights), so it does not negate a "
                "task vector; pass --no-normalize for negation"]
    return [f"{spec.name}: a negative --weights value with --normalize divides by the weight sum "
            f"{sum(weights):g}, which can flip or blow up the merged delta; pass --no-normalize "
            "for negation"]
