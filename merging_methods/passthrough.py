"""Passthrough: assemble a model from unmodified layer ranges of donors ("frankenmerge";
mergekit's `passthrough`; ALGORITHMS.md §7, §18.4-18.6).

No tensor math beyond an optional `scale`: this module plans which source tensor each output
tensor copies. For slices (model m_s, layers [a_s, b_s)) in order:

    output layer  off_s + j  =  layer a_s + j of model m_s,  off_s = Σ_{r<s} (b_r − a_r)
    num_hidden_layers = Σ_s (b_s − a_s)
    pre-layer tensors (the input embedding) come from slices[0]'s model, post-layer tensors
    (final norm, lm_head) from slices[-1]'s model, each under its own name
    out = source·scale, or the source copied unchanged when no scale is set

The runner (`--method passthrough --layer_ranges`, or a YAML `slices:` config) reads the
`passthrough_plan` and writes `passthrough(...)` of each source. The optional per-model `scale`
is resolved by the parameter layer for (slice, source tensor
name, x), with x the layer's position in its slice (§18.4: j/(Ls − 1), 1 when Ls = 1; 0 for
pre- and post-layer tensors); filters match the *source* name (§18.5).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import Tensor

from checkpoints.checkpoint import HEAD_SUFFIXES, CheckpointReader
from checkpoints.errors import UserError
from merging_methods.plan import input_embedding_name

DECODER_LAYER = re.compile(r"^(.*\b(?:layers|h)\.)(\d+)(\..+)$")  # prefix, index, rest
ScaleFn = Callable[[int, str, float], float | None]  # (slice index, source name, x) -> scale


@dataclass(frozen=True)
class LayerSlice:
    """Layers [start, end) of input model `model` (an index into the models)."""

    model: int
    start: int
    end: int


@dataclass(frozen=True)
class Source:
    """Where one output tensor comes from: a model index, its tensor name, and a scale."""

    model: int
    name: str
    scale: float | None = None


@dataclass(frozen=True)
class PassthroughPlan:
    """Output tensor name -> its Source (pre-layer, layers in order, post-layer), and depth."""

    sources: dict[str, Source]
    num_hidden_layers: int


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """("model.layers.", 3, ".mlp.up_proj.weight") for a decoder-layer tensor, else None."""
    match = DECODER_LAYER.match(name)
    return (match[1], int(match[2]), match[3]) if match else None


def is_pre_layer(name: str) -> bool:
    """Whether a non-layer tensor sits before the layers: an input embedding, not a head."""
    return ("embed" in name and "embed_out" not in name) or name.endswith(("wte.weight",
                                                                         "wpe.weight"))


def slice_position(j: int, length: int) -> float:
    """x of the j-th layer of a slice of `length` layers (§18.4): j/(length − 1), 1 if length 1."""
    return j / (length - 1) if length > 1 else 1.0


def _check(slices: Sequence[LayerSlice], num_layers: Sequence[int]) -> None:
    if not slices:
        raise UserError("slices: passthrough needs at least one slice")
    for s, piece in enumerate(slices):
        if not 0 <= piece.model < len(num_layers):
            raise ValueError(f"slices[{s}]: model index {piece.model} for "
                             f"{len(num_layers)} models")
        if not 0 <= piece.start < piece.end <= num_layers[piece.model]:
            raise UserError(f"slices[{s}]: layer_range [{piece.start}, {piece.end}] must "
                            f"satisfy 0 <= start < end <= {num_layers[piece.model]} (the "
                            f"model's num_hidden_layers)")


def passthrough_plan(slices: Sequence[LayerSlice], names: Sequence[Sequence[str]],
                     num_layers: Sequence[int], scale: ScaleFn | None = None) -> PassthroughPlan:
    """The output tensors of a passthrough merge, renumbered (§7, §18.6).

    names[m] / num_layers[m]: tensor names and num_hidden_layers of model m.
    """
    _check(slices, num_layers)

    def source(s: int, name: str, x: float) -> Source:
        return Source(slices[s].model, name, scale(s, name, x) if scale else None)

    def outer(m: int, pre: bool) -> list[str]:
        return [n for n in names[m] if split_layer_name(n) is None and is_pre_layer(n) == pre]

    sources = {name: source(0, name, 0.0) for name in outer(slices[0].model, True)}
    offset = 0
    for s, piece in enumerate(slices):
        length = piece.end - piece.start
        for name in names[piece.model]:
            parts = split_layer_name(name)
            if parts is None or not piece.start <= parts[1] < piece.end:
                continue
            prefix, layer, rest = parts
            j = layer - piece.start
            sources[f"{prefix}{offset + j}{rest}"] = source(s, name, slice_position(j, length))
        offset += length
    last = len(slices) - 1
    sources.update({name: source(last, name, 0.0) for name in outer(slices[last].model, False)})
    return PassthroughPlan(sources, offset)


def layout_update(donor_config: dict, configs: Sequence[dict],
                  slices: Sequence[LayerSlice]) -> dict:
    """config.json updates of stacked slices (configs[m]: model m's config.json): the depth
    and, when the donor has them, per-layer lists (`layer_types`) taken from the slices' models."""
    updates: dict = {"num_hidden_layers": sum(s.end - s.start for s in slices)}
    if isinstance(donor_config.get("layer_types"), list):
        updates["layer_types"] = [configs[s.model]["layer_types"][layer]
                                  for s in slices for layer in range(s.start, s.end)]
    return updates


def scaled_copy(source: Tensor, scale: float | None) -> Tensor:
    """The output tensor: `source` itself when no scale is set, else source·scale in float32."""
    return source if scale is None else source.float() * scale


def passthrough(base: Tensor, others: list[Tensor], *, scale: Sequence[float]) -> Tensor:
    """One output tensor in the method contract's form: its one source `others[0]` times its
    slice's scale, float32 (`base` is unused: the runner's layer plan picks the source)."""
    return scaled_copy(others[0].float(), scale[0])


def heads_like(plan: PassthroughPlan, donor: CheckpointReader,
               readers: list[CheckpointReader]) -> PassthroughPlan:
    """Output heads as the donor's config.json declares them (§0.2): none when it ties its
    embeddings; else each head, read from the last slice's model or, when that model ties its
    head, from its input embedding."""
    sources = {n: s for n, s in plan.sources.items()
               if not (n.endswith(HEAD_SUFFIXES) and donor.tie_word_embeddings)}
    if not donor.tie_word_embeddings:
        last = plan.sources[next(reversed(plan.sources))].model
        for head in (n for n in donor.info if n.endswith(HEAD_SUFFIXES) and n not in sources):
            embedding = input_embedding_name(readers[last])
            if embedding is None:
                raise UserError(f"{readers[last].label} has neither {head} nor an input "
                                "embedding to use as the output head")
            sources[head] = Source(last, embedding)
    return PassthroughPlan(sources, plan.num_hidden_layers)
