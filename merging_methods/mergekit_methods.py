"""The YAML parameters of every method merge.py reads from mergekit configs (ALGORITHMS.md §19.2),
derived from the registry's `Param` declarations: a parameter's YAML key is its mergekit name
(`Param.mergekit`) or, for our own methods and options, its own name.

Only mergekit 0.1.5's facts that no declaration carries are written here: which YAML keys it
accepts without any effect on our methods, where its YAML defaults differ from our flags' (a
required `weight`/`t` is `Param.yaml_required`), and which methods treat the base as an input
or take it optionally.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from merging_methods.params import Param
from merging_methods.registry import METHODS as SPECS, MethodSpec, declared_params

REQUIRED = object()  # a parameter without default: mergekit errors when no scope sets it


@dataclass(frozen=True)
class MethodParams:
    """The YAML parameters of one method (YAML keys) with their YAML defaults (§19.2).

    A default of None means "unset" (passthrough's `scale`). `uses_base`: the base is the
    origin of the deltas; False: it is an ordinary input with its own per-model values.
    `others`: allowed number of non-base inputs per slice (max None = no limit).
    """

    per_model: Mapping[str, object]
    shared: Mapping[str, object]
    uses_base: bool = True
    others: tuple[int, int | None] = (0, None)


_GTA = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
        "della", "della_linear")
ACCEPTED_NO_EFFECT: dict[str, dict[str, object]] = {  # mergekit keys that change nothing here
    **{m: {"int8_mask": False} for m in _GTA},          # a mergekit memory option
    "task_arithmetic": {"int8_mask": False, "density": 1.0, "rescale": False},  # no sparsifier
    "sce": {"int8_mask": False, "weight": 1.0},  # sce weighs models by their deltas (§19.7)
}
YAML_DEFAULTS: dict[str, dict[str, object]] = {  # mergekit 0.1.5's defaults where ours differ
    "dare_linear": {"rescale_mode": "l1"}, "dare_ties": {"rescale_mode": "l1"},  # §19.3
    "ties": {"mergekit_trim": True},                                             # §19.3
    "passthrough": {"scale": None},
}
BASE_AS_INPUT = {"linear": (1, None), "passthrough": (1, 1),   # method -> inputs per slice
                 "karcher": (1, None)}
BASE_AVERAGED_IN = frozenset({"karcher"})
"""Methods that average a configured base_model in as one more input (§19.6 reference quirk,
kept for parity): a config with a base_model gets a warning."""
BASE_OPTIONAL = {"nuslerp": "task_vectors", "multislerp": "task_vectors"}
"""Methods whose base_model is optional -> the parameter saying whether there is one: with a
base they merge the task vectors, without it the models themselves (§19.4, §19.5). It is no
YAML key: a config's base_model sets it."""
IN_MERGEKIT = frozenset({"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp",
                         "passthrough", "model_stock", "breadcrumbs", "breadcrumbs_ties", "della",
                         "della_linear", "nuslerp", "multislerp", "karcher", "sce", "nearswap",
                         "arcee_fusion", "ram", "ramplus_tl"})
"""Our methods that mergekit 0.1.5 registers too (§19.1); the others are this toolkit's own."""


def trim_densities(params: dict) -> dict:
    """Our keywords for mergekit 0.1.5's magnitude trim (`mergekit_trim`, §19.3), whose density
    has no range: density >= 1 keeps every entry (density 1), density <= 0 zeroes the task
    vector, which under TIES's sign election is the model at weight 0 (a zero delta neither
    votes nor agrees, so it changes neither the sum nor the divisor)."""
    if not params.get("mergekit_trim") or "density" not in params:
        return params
    kept = [(w, min(d, 1.0)) if d > 0 else (0.0, 1.0)
            for w, d in zip(params["weights"], params["density"])]
    return {**params, "weights": [w for w, _ in kept], "density": [d for _, d in kept]}


def yaml_key(param: Param) -> str:
    return param.mergekit or param.name


def _default(method: str, param: Param) -> object:
    if param.yaml_required:
        return REQUIRED
    return YAML_DEFAULTS.get(method, {}).get(param.name, param.default)


def _table(spec: MethodSpec) -> MethodParams:
    per_model_keys = {yaml_key(p) for p in declared_params().values() if p.per_model}
    per_model, shared = {}, {}
    for param in spec.params.values():
        if param.name == BASE_OPTIONAL.get(spec.name):
            continue
        (per_model if param.per_model else shared)[yaml_key(param)] = _default(spec.name, param)
    for key, default in ACCEPTED_NO_EFFECT.get(spec.name, {}).items():
        (per_model if key in per_model_keys else shared)[key] = default
    if spec.name in BASE_AS_INPUT:
        return MethodParams(per_model, shared, uses_base=False, others=BASE_AS_INPUT[spec.name])
    return MethodParams(per_model, shared, others=spec.others)


METHODS: dict[str, MethodParams] = {name: _table(spec) for name, spec in SPECS.items()}
BOOL_PARAMS = frozenset({yaml_key(p) for p in declared_params().values() if p.kind is bool}
                        | {"int8_mask"})
def _text_choices() -> dict[str, tuple[str, ...] | None]:
    choices: dict[str, tuple[str, ...] | None] = {}
    for spec in SPECS.values():
        for param in (p for p in spec.params.values() if p.kind is str):
            known = choices.get(yaml_key(param)) or ()
            choices[yaml_key(param)] = None if param.names_model else (
                *known, *(c for c in param.choices if c not in known))
    return choices


TEXT_CHOICES = _text_choices()
"""YAML keys whose values are text -> every method's choices together (None: a model reference,
`Param.names_model`); a method's own choices are checked with its parameters."""
INTERNAL_NAMES = {name: {yaml_key(p): p.name for p in spec.params.values()
                         if yaml_key(p) != p.name} for name, spec in SPECS.items()}
"""Method -> {YAML parameter -> its keyword, where they differ} (per method: della's and ram's
`epsilon` are different parameters)."""
NO_EFFECT = {method: tuple(ACCEPTED_NO_EFFECT.get(method, {})) for method in METHODS}
"""Parameters mergekit accepts that change nothing in our method: read, never passed on."""
