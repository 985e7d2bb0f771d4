"""mergekit YAML and MergeRecipe, both ways (ALGORITHMS.md §18).

    recipe = recipe_from_config("merge.yml", save_path="out")   # merge.py --config
    inputs, readers = open_sliced(recipe)                        # a slices: config's inputs
    args_at = tensor_arguments(recipe, depths)                   # one tensor's method keywords
    record = record_of(recipe, {})                               # what merge_recipe.yaml holds

A config recipe keeps its `MergeConfig`: the runner resolves the method's parameters for every
tensor from it (scopes, filters, layer gradients). Every recipe, from flags or from a config,
is written as a config (plus this toolkit's `merge` record), so `merge.py --config
OUT/merge_recipe.yaml` reproduces OUT.
"""
from __future__ import annotations

from typing import Callable, Mapping

from checkpoints.checkpoint import CheckpointReader, resolve_model_dir
from merging_methods.mergekit_config import (MergeConfig, ModelRef, Slice, Source, config_doc,
                                             load_config)
from merging_methods.mergekit_methods import BASE_AS_INPUT, BASE_OPTIONAL, yaml_key
from merging_methods.mergekit_plan import (POST, PRE, Position, donor, method_params, plan_merge,
                                           referenced_models, resolve)
from merging_methods.passthrough import is_pre_layer, split_layer_name
from merging_methods.plan import num_layers
from merging_methods.recipe import MergeRecipe
from merging_methods.registry import get_method
from merging_methods.sliced import SlicedInput, check_slices, input_order, sliced_inputs


def model_path(ref: ModelRef) -> str:
    """A config's model reference as merge.py names models: the folder or hub id, with
    `@revision` for a hub revision (resolve_model_dir reads it)."""
    return str(ref)


def _depths(config: MergeConfig) -> dict[str, int]:
    """num_hidden_layers of every model the config reads (headers and config.json only)."""
    def depth(path: str) -> int:
        return num_layers(CheckpointReader(resolve_model_dir(path, "--config"), path).config) or 0
    return {path: depth(path) for path in map(model_path, referenced_models(config))}


def recipe_from_config(path: str, **runtime) -> MergeRecipe:
    """The recipe of a mergekit YAML file; `runtime`: save_path, device, max_shard_size,
    overwrite. Its `models` are the first slice's (every slice merges as many)."""
    config = load_config(path)
    spec = get_method(config.merge_method)
    depths = _depths(config)
    plan = plan_merge(config, {ref: depths[model_path(ref)] for ref in referenced_models(config)})
    common = dict(method=spec.name, base_model=model_path(donor(config)), seed=config.seed or 0,
                  dtype=config.out_dtype or config.dtype, vocab=config.vocab or "base",
                  config=config, **runtime)
    if spec.stacks_layers:
        sources = [piece.sources[0] for piece in plan.slices]
        return MergeRecipe(models=tuple(model_path(s.model) for s in sources),
                           layer_ranges=tuple(s.layer_range for s in sources), **common)
    check_slices(config, plan.slices)
    others = input_order(config, plan.slices[0])[1:]   # recorded: the first slice's models
    return MergeRecipe(models=tuple(model_path(s.model) for s in others), **common)


def input_paths(recipe: MergeRecipe) -> tuple[str, ...]:
    """Every model folder or hub id the merge reads (a config's later slices included)."""
    refs = referenced_models(recipe.config) if recipe.config is not None else ()
    return tuple(dict.fromkeys((recipe.base_model, *recipe.models, *map(model_path, refs))))


def is_sliced(recipe: MergeRecipe) -> bool:
    """Whether the recipe merges a `slices:` config tensor by tensor (not passthrough)."""
    return (recipe.config is not None and recipe.config.slices is not None
            and not get_method(recipe.method).stacks_layers)


def open_sliced(recipe: MergeRecipe) -> tuple[list[SlicedInput], list[CheckpointReader]]:
    """The inputs of a sliced recipe (base first, named like the output) and the checkpoints
    they read."""
    config = recipe.config
    readers = {ref: CheckpointReader(resolve_model_dir(model_path(ref), "--config"),
                                     model_path(ref)) for ref in referenced_models(config)}
    plan = plan_merge(config, {ref: num_layers(r.config) or 0 for ref, r in readers.items()})
    return (sliced_inputs(config, plan.slices, readers, readers[donor(config)]),
            list(readers.values()))


def _position(name: str) -> Position:
    parts = split_layer_name(name)
    if parts is not None:
        return parts[1]
    return PRE if is_pre_layer(name) else POST


def tensor_arguments(recipe: MergeRecipe, depths: Mapping[str, int]) -> Callable[[str], dict]:
    """Output tensor name -> the method's keyword arguments there: the recipe's own for a recipe
    from flags; resolved from the config for that tensor otherwise (`depths`: num_hidden_layers
    by model path). Values are checked as flags are (the flag named in an error)."""
    if recipe.config is None:
        arguments = recipe.arguments()
        return lambda _name: arguments
    spec = get_method(recipe.method)
    refs = referenced_models(recipe.config)
    plan = plan_merge(recipe.config, {ref: depths[model_path(ref)] for ref in refs})

    def at(name: str) -> dict:
        merge = resolve(plan, name, _position(name))
        values = spec.resolve(method_params(merge), len(merge.others))
        return spec.arguments(values, tuple(model_path(i.model) for i in merge.others))
    return at


def config_of(recipe: MergeRecipe, out_dtype: str | None = None) -> MergeConfig:
    """A recipe from flags as the config that reproduces it: per-model values under each model,
    the others under `parameters:`, every one written out. A `linear` or `karcher` config has no
    base_model (mergekit would average it in), nor has a nuslerp/multislerp one of the models
    themselves (--no-task_vectors), so the first model donates config.json and tokenizer then;
    `out_dtype` (the dtype the merge wrote) is then recorded, or the donor's dtype would be used."""
    if recipe.config is not None:
        return recipe.config
    spec = get_method(recipe.method)
    base_flag = BASE_OPTIONAL.get(spec.name)   # said by base_model's presence, not a YAML key
    no_base = spec.name in BASE_AS_INPUT or (base_flag is not None and not recipe.params[base_flag])

    def values(index: int | None) -> dict:
        return {yaml_key(p): recipe.params[n] if index is None else recipe.params[n][index]
                for n, p in spec.params.items()
                if p.per_model == (index is not None) and n != base_flag}

    models = [Source(ModelRef(m), values(i)) for i, m in enumerate(recipe.models)]
    # `tokenizer_source: union` is mergekit's union by token; ours (§13.1) has its own key
    vocab = dict(tokenizer_source="base") if recipe.vocab == "base" else dict(vocab=recipe.vocab)
    shared = dict(parameters=values(None), seed=recipe.seed,
                  out_dtype=recipe.dtype or (out_dtype if no_base else None), **vocab)
    if spec.stacks_layers:
        slices = tuple(Slice((Source(s.model, s.parameters, r),))
                       for s, r in zip(models, recipe.layer_ranges))
        return MergeConfig(spec.name, slices=slices, base_model=ModelRef(recipe.base_model),
                           **shared)
    base = None if no_base else ModelRef(recipe.base_model)
    return MergeConfig(spec.name, models=tuple(models), base_model=base, **shared)


def record_of(recipe: MergeRecipe, extra: dict, out_dtype: str | None = None,
              layers_moved: bool = False) -> dict:
    """merge_recipe.yaml: the config that reproduces the merge (`out_dtype`: the dtype it wrote),
    this toolkit's `merge` record (read by aim/, evaluation/, study/ and the report; with
    `layers_moved`, `base_layers_moved: true`: some output layer is not the base's layer of
    that index, so post-hoc AIM must refuse it) and `extra` (e.g. the `aim` record)."""
    merge = {**recipe.as_record(), **({"base_layers_moved": True} if layers_moved else {})}
    return {**config_doc(config_of(recipe, out_dtype)), "merge": merge, **extra}
