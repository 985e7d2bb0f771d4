"""`slices:` for every method: each input of a sliced mergekit config seen as one checkpoint
named like the output (ALGORITHMS.md §18.6).

Output layer off_s + j of slice s is the method applied to layer a_k + j of every source k of
that slice; the embeddings come from slices[0]'s sources and the final norm and lm_head from
slices[-1]'s. Input k of the merge is the k-th source of every slice (the base first, then the
others in config order, as mergekit_plan.resolve lists their parameters), so a `SlicedInput`
maps each output tensor name to the model and source tensor that feed it there. The runner then
merges tensor by tensor as for `models:`; the parameters per tensor come from the config
(mergekit_plan), with filters matched on the source names.
"""
from __future__ import annotations

from typing import Mapping

import torch

from checkpoints.checkpoint import CheckpointReader, TensorInfo
from checkpoints.errors import UserError
from merging_methods.mergekit_config import MergeConfig, ModelRef, Slice, Source, base_index
from merging_methods.passthrough import LayerSlice, heads_like, layout_update, passthrough_plan
from merging_methods.plan import num_layers


class SlicedInput:
    """One input of a sliced merge as a checkpoint: the output's tensor names, each read from
    its source model's tensor. Config facts (vocab size, tied head, dtype) are `like`'s, with
    the output's depth and layer list (`layout`: the config.json updates of the output)."""

    def __init__(self, label: str, routes: Mapping[str, tuple[CheckpointReader, str]],
                 like: CheckpointReader, layout: dict):
        self.label, self.routes, self.like, self.folder = label, dict(routes), like, like.folder
        self.info: dict[str, TensorInfo] = {n: r.info[s] for n, (r, s) in self.routes.items()}
        self.layout, self.config = layout, {**like.config, **layout}

    @property
    def moves_layers(self) -> bool:
        """Whether some output tensor is not `like`'s tensor of the same name."""
        return any(r is not self.like or s != n for n, (r, s) in self.routes.items())

    @property
    def mixes_models(self) -> bool:
        """Whether some output tensor comes from another model than `like` (whose tokenizer
        and vocabulary the input is taken to have)."""
        return any(r is not self.like for r, _ in self.routes.values())

    @property
    def names(self) -> list[str]:
        return list(self.info)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        reader, source = self.routes[name]
        return reader.get(source, rows)

    @property
    def vocab_size(self) -> int | None:
        return self.like.vocab_size

    @property
    def tie_word_embeddings(self) -> bool:
        return self.like.tie_word_embeddings

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.like.stored_dtype


def input_order(config: MergeConfig, piece: Slice) -> list[Source]:
    """The slice's sources as merge inputs: the base first, then the others; a method without a
    base (linear) gets its first source as the (unused) base and every source as an input."""
    base = base_index(config, piece)
    if base is None:
        return [piece.sources[0], *piece.sources]
    return [piece.sources[base], *(s for k, s in enumerate(piece.sources) if k != base)]


def check_slices(config: MergeConfig, slices: tuple[Slice, ...]) -> None:
    """Every slice must merge as many models as the first (input k is source k everywhere)."""
    for i, piece in enumerate(slices):
        if len(piece.sources) != len(slices[0].sources):
            raise UserError(f"{config.origin}: slices[{i}]: {len(piece.sources)} sources, "
                            f"slices[0] has {len(slices[0].sources)}; merge.py merges the same "
                            "number of models in every slice")


def sliced_inputs(config: MergeConfig, slices: tuple[Slice, ...],
                  readers: Mapping[ModelRef, CheckpointReader],
                  donor: CheckpointReader) -> list[SlicedInput]:
    """The merge's inputs, base first (`slices`: the plan's, every layer_range set; `readers`:
    one per model the config references). The base's config facts are the donor's."""
    check_slices(config, slices)
    refs = list(readers)
    names = [list(readers[r].info) for r in refs]
    configs = [readers[r].config for r in refs]
    inputs = []
    for k in range(len(input_order(config, slices[0]))):
        pieces = [LayerSlice(refs.index(s.model), *s.layer_range)
                  for s in (input_order(config, piece)[k] for piece in slices)]
        models = list(dict.fromkeys(readers[refs[p.model]] for p in pieces))
        like = donor if k == 0 else models[0]
        # heads as `like` declares them: the last slice's model may tie them where it does not
        plan = heads_like(passthrough_plan(pieces, names, [num_layers(c) or 0 for c in configs]),
                          like, [readers[r] for r in refs])
        routes = {n: (readers[refs[s.model]], s.name) for n, s in plan.sources.items()}
        layout = layout_update(like.config, configs, pieces)
        inputs.append(SlicedInput(" + ".join(m.label for m in models), routes, like, layout))
    return inputs
