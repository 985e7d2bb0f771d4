"""What a mergekit config means per output tensor: layer plan and parameter values (§18.3-18.6).

The runner calls `plan_merge` once, after reading every input's `num_hidden_layers`, then
`resolve(plan, name, position)` for each output tensor: it says which tensor of which model
to read, which input is the base, and the value of every parameter there. Calling `resolve` for
all names before loading any weight is the preflight: a missing required parameter fails then.
Pure: no torch, no I/O.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Mapping, Union

from merging_methods.mergekit_config import (Gradient, MergeConfig, ModelRef, Params, Scalar,
                                             Setting, Slice, Source, UserError, base_index,
                                             effective_slices)
from merging_methods.mergekit_methods import (BASE_OPTIONAL, INTERNAL_NAMES, METHODS, NO_EFFECT,
                                              REQUIRED, trim_densities)

PRE, POST = "pre", "post"  # embeddings before the layers; final norm and lm_head after them
Position = Union[int, Literal["pre", "post"]]  # int: the output layer index


@dataclass(frozen=True)
class OutputLayer:
    """Output layer = the method over layer `sources[k][1]` of model `sources[k][0]` (§18.6)."""

    slice: int  # index into MergePlan.slices
    x: float  # position for gradients: j / (slice length - 1), 1 for a one-layer slice
    sources: tuple[tuple[ModelRef, int], ...]  # (model, source layer), in the slice's order


@dataclass(frozen=True)
class MergePlan:
    config: MergeConfig
    slices: tuple[Slice, ...]  # effective slices, every layer_range set
    layers: tuple[OutputLayer, ...]  # one per output layer, renumbered from 0

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class TensorInput:
    model: ModelRef
    tensor: str  # the name to read from that model (its own layer index)
    params: Mapping[str, Scalar]  # per-model values; empty for the base


@dataclass(frozen=True)
class TensorMerge:
    """Everything the method needs for one output tensor, with mergekit's names."""

    method: str
    tensor: str  # output name
    base: TensorInput | None  # None for linear and passthrough (the base is then an input)
    others: tuple[TensorInput, ...]  # config order
    shared: Mapping[str, Scalar]


def referenced_models(config: MergeConfig) -> tuple[ModelRef, ...]:
    """Every model the merge reads, once each, in document order (base first when set)."""
    refs = [config.base_model] if config.base_model else []
    for piece in effective_slices(config):
        refs += [piece.base_model, *(s.model for s in piece.sources)]
    return tuple(dict.fromkeys(r for r in refs if r is not None))


def donor(config: MergeConfig) -> ModelRef:
    """The model whose config.json and tokenizer the output gets: the base, else the first model
    in document order (§18.7 Decision; mergekit's choice there varies between runs)."""
    return config.base_model or referenced_models(config)[0]


def plan_merge(config: MergeConfig, depths: Mapping[ModelRef, int]) -> MergePlan:
    """Lay out the output layers; `depths[m]` = model m's num_hidden_layers."""
    slices = effective_slices(config)
    if config.models is not None:
        counts = {depths[s.model] for s in slices[0].sources}
        if len(counts) > 1:
            raise UserError(f"{config.origin}: models: all models must have the same number of "
                            f"layers, got {sorted(counts)}")
        depth = counts.pop()
        whole = tuple(Source(s.model, s.parameters, (0, depth)) for s in slices[0].sources)
        slices = (Slice(whole, slices[0].parameters, slices[0].base_model),)
    layers = []
    for i, piece in enumerate(slices):
        for source in piece.sources:
            if source.layer_range[1] > depths[source.model]:
                raise UserError(f"{config.origin}: slices[{i}]: layer_range "
                                f"{list(source.layer_range)} goes past the "
                                f"{depths[source.model]} layers of {source.model}")
        first, end = piece.sources[0].layer_range
        length = end - first
        for j in range(length):
            feeds = tuple((s.model, s.layer_range[0] + j) for s in piece.sources)
            layers.append(OutputLayer(i, j / (length - 1) if length > 1 else 1.0, feeds))
    return MergePlan(config, slices, tuple(layers))


def resolve(plan: MergePlan, tensor: str, position: Position) -> TensorMerge:
    """Inputs and parameter values of output `tensor` (§18.5): per-model values from the model's,
    the slice's, then the top-level parameters, matched on the model's source name; shared ones
    from the slice's, then the top-level, matched on the output name; then the method default."""
    config, spec = plan.config, METHODS[plan.config.merge_method]
    if position in (PRE, POST):
        index, x = (0 if position == PRE else -1), 0.0
        names = [tensor] * len(plan.slices[index].sources)
    else:
        layer = plan.layers[position]
        index, x = layer.slice, layer.x
        names = [_rename(tensor, position, source_layer) for _, source_layer in layer.sources]
    piece = plan.slices[index]
    scopes = (piece.parameters, config.parameters)
    shared = _values(spec.shared, scopes, tensor, x, config.origin, f"tensor {tensor}")
    base = base_index(config, piece)
    others = tuple(TensorInput(s.model, names[k], _values(
        spec.per_model, (s.parameters, *scopes), names[k], x, config.origin,
        f"model {s.model}, tensor {tensor}")) for k, s in enumerate(piece.sources) if k != base)
    merge = TensorMerge(config.merge_method, tensor, None if base is None else TensorInput(
        piece.sources[base].model, names[base], {}), others, shared)
    _check_della(merge, config.origin)
    return merge


def method_params(merge: TensorMerge) -> dict[str, object]:
    """The keywords for our method function: per-model values as one list over `others`, and
    for a method whose base is optional whether the config has one."""
    names = dict.fromkeys(n for i in merge.others for n in i.params)
    values = {**{n: [i.params.get(n) for i in merge.others] for n in names}, **merge.shared}
    if merge.method in BASE_OPTIONAL:
        values[BASE_OPTIONAL[merge.method]] = merge.base is not None
    return trim_densities({INTERNAL_NAMES[merge.method].get(n, n): v for n, v in values.items()
                           if n not in NO_EFFECT[merge.method]})


def gradient_value(values: tuple[Scalar, ...], x: float) -> Scalar:
    """mergekit's interpolation at depth x in [0, 1] (§18.4); booleans and texts are picked,
    not mixed."""
    s = x * (len(values) - 1)
    i0 = math.floor(s)
    if any(isinstance(v, (bool, str)) for v in values):
        return values[i0]
    i1, f = min(len(values) - 1, i0 + 1), s - i0
    return (1 - f) * values[i0] + f * values[i1]


def setting_value(setting: Setting, name: str, x: float) -> Scalar | None:
    """A setting at tensor `name`, depth x; None when no filter entry matches (§18.3)."""
    if isinstance(setting, tuple):
        rule = next((r for r in setting if r.filter in (None, "*") or r.filter in name), None)
        return None if rule is None else setting_value(rule.value, name, x)
    return gradient_value(setting.values, x) if isinstance(setting, Gradient) else setting


def _values(defaults: Mapping[str, object], scopes: tuple[Params, ...], name: str, x: float,
            origin: str, where: str) -> dict[str, Scalar]:
    """The first scope that yields a value wins, else the default; unset ones are left out."""
    out = {}
    for param, default in defaults.items():
        found = (setting_value(scope[param], name, x) for scope in scopes if param in scope)
        value = next((v for v in found if v is not None), default)
        if value is REQUIRED:
            raise UserError(f"{origin}: missing required parameter {param!r} for {where}; "
                            "no parameters: scope gives it a value there")
        if value is not None:
            out[param] = value
    return out


def _rename(tensor: str, layer: int, source_layer: int) -> str:
    """`tensor` with its first `.<layer>.` segment replaced by the source layer index."""
    renamed, found = re.subn(rf"(^|\.){layer}(?=\.|$)", rf"\g<1>{source_layer}", tensor, count=1)
    if not found:
        raise ValueError(f"tensor name {tensor!r} has no layer index {layer}")
    return renamed


def _check_della(merge: TensorMerge, origin: str) -> None:
    """DELLA's keep probabilities density +- epsilon must lie in (0, 1) (§17.1)."""
    if merge.method not in ("della", "della_linear"):
        return
    for model in merge.others:
        p, eps = model.params["density"], model.params["epsilon"]
        if 0 < p < 1 and not (p - eps > 0 and p + eps < 1):
            raise UserError(f"{origin}: model {model.model}, tensor {merge.tensor}: della needs "
                            f"density - epsilon > 0 and density + epsilon < 1, got density {p:g} "
                            f"and epsilon {eps:g}")
