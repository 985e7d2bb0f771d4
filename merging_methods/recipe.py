"""MergeRecipe: the validated, fully resolved description of one merge.

A recipe checks itself when it is built (`__post_init__`), before any checkpoint is opened, so
a typo fails in a second instead of after a download, whether it comes from merge.py's flags or
from code (the study, tests). The resolved recipe (every method parameter with its default
filled in) is what the runner executes and what it writes next to the weights. The method
flags of merge.py are generated from the parameter declarations (params.py, registry.py).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from checkpoints.checkpoint import dtype_name, parse_dtype, parse_size
from checkpoints.errors import UserError
from merging_methods.mergekit_config import MergeConfig, config_doc
from merging_methods.params import Param
from merging_methods.primitives import MASK_RULE
from merging_methods.registry import ALIASES, METHODS, declared_params, get_method

VOCAB_MODES = ("base", "union")


@dataclass(frozen=True)
class MergeRecipe:
    method: str
    base_model: str
    models: tuple[str, ...]
    save_path: str
    params: dict = field(default_factory=dict)    # given; resolved (defaults filled) on build
    seed: int = 0
    vocab: str = "base"
    dtype: str | None = None                      # output dtype; None = the base's
    device: str = "auto"
    max_shard_size: str = "5GB"
    overwrite: bool = False
    mask_rule: int = MASK_RULE                    # how DARE's masks are drawn (primitives.py)
    layer_ranges: tuple[tuple[int, int], ...] | None = None   # passthrough: [a, b) per model
    # from merge.py --config: the method's parameters are resolved from it tensor by tensor
    # (yaml_recipe.tensor_arguments), so `params` stays empty
    config: MergeConfig | None = None

    def __post_init__(self):
        spec = get_method(self.method)
        if "mask_keys" in spec.context and self.mask_rule != MASK_RULE:
            raise UserError(f"mask_rule {self.mask_rule}: this recipe's DARE masks were drawn "
                            f"with rule {self.mask_rule} (torch.rand per tensor), which this "
                            f"toolkit no longer has; it draws rule {MASK_RULE} (counter-based): "
                            f"set mask_rule: {MASK_RULE} for new masks, or use a toolkit from "
                            f"before rule {MASK_RULE} to reproduce the old output")
        models = tuple(self.models)
        if not models:
            raise UserError("--models_to_merge: give at least one model (comma-separated)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"--seed: expected a whole number, got {self.seed!r}")
        if self.vocab not in VOCAB_MODES:
            raise UserError(f"--vocab: expected one of {', '.join(VOCAB_MODES)}, got {self.vocab!r}")
        if self.dtype is not None:   # recorded by its full name: an alias is no YAML dtype
            object.__setattr__(self, "dtype", dtype_name(parse_dtype(self.dtype)))
        parse_size(self.max_shard_size)
        spec.check_count(len(models))
        if spec.stacks_layers:
            object.__setattr__(self, "layer_ranges", _check_layer_ranges(self.layer_ranges,
                                                                         len(models)))
        elif self.layer_ranges is not None:
            raise UserError(f"--layer_ranges applies only to --method passthrough, not "
                            f"{spec.name}")
        object.__setattr__(self, "method", spec.name)   # an alias is recorded by its method
        object.__setattr__(self, "models", models)
        if self.config is not None:
            if self.params:
                raise UserError("a recipe from a config takes its parameters from the config")
            return
        object.__setattr__(self, "params", spec.resolve(self.params, len(models)))
        self.arguments()

    def arguments(self) -> dict:
        """The keyword arguments of the method function (a named model becomes its index)."""
        return get_method(self.method).arguments(self.params, self.models)

    @classmethod
    def from_record(cls, merge: dict) -> MergeRecipe:
        """The recipe of a merge_recipe.yaml's `merge` section; a record without `mask_rule`
        predates it (rule 1)."""
        return cls(**{"mask_rule": 1, **merge})

    def as_record(self) -> dict:
        """The recipe's fields as plain values (a config as its YAML mapping)."""
        record = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        if self.config is None:
            del record["config"]
        else:
            record["config"] = config_doc(self.config)
        return record


def _plain(value: object) -> object:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _check_layer_ranges(ranges: object, n_models: int) -> tuple[tuple[int, int], ...]:
    """One half-open [a, b) layer range per model, 0 <= a < b (the depth is checked in preflight)."""
    if ranges is None:
        raise UserError("--layer_ranges: passthrough needs one layer range per model, e.g. "
                        "--layer_ranges 0:4,2:6")
    ranges = tuple(tuple(r) for r in ranges)
    if len(ranges) != n_models:
        raise UserError(f"--layer_ranges: {len(ranges)} ranges for {n_models} models; give one "
                        "per --models_to_merge entry (list a model twice to take two ranges)")
    for a, b in ranges:
        if not 0 <= a < b:
            raise UserError(f"--layer_ranges: {a}:{b} must satisfy 0 <= start < end")
    return ranges


def parse_layer_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """'0:4,2:6' -> ((0, 4), (2, 6)): half-open ranges of decoder layers."""
    try:
        return tuple((int(a), int(b)) for a, b in (part.split(":") for part in text.split(",")))
    except ValueError:
        raise UserError(f"--layer_ranges: expected comma-separated start:end pairs (end "
                        f"excluded), e.g. 0:4,2:6; got {text!r}") from None


def _defaults_text(name: str) -> str:
    """The per-method defaults of parameter `name`, e.g. 'on for linear, ties; off otherwise'."""
    def show(value: object) -> str:
        if value is None:
            return "required"
        return ("on" if value else "off") if isinstance(value, bool) else f"{value}"

    by_value: dict[str, list[str]] = {}
    for method, spec in sorted(METHODS.items()):
        if name in spec.params:
            by_value.setdefault(show(spec.params[name].default), []).append(method)
    if len(by_value) == 1:
        return next(iter(by_value))
    *special, (common, _) = sorted(by_value.items(), key=lambda item: len(item[1]))
    return "; ".join(f"{v} for {', '.join(ms)}" for v, ms in special) + f"; {common} otherwise"


def _add_param_flag(group: argparse._ArgumentGroup, param: Param) -> None:
    """The flag of one declared parameter (None when not given: the method's default applies)."""
    text = f"{param.help} (default: {_defaults_text(param.name)})"
    if param.kind is bool:
        group.add_argument(param.flag, dest=param.name, action=argparse.BooleanOptionalAction,
                           default=None, help=text)
    elif param.per_model or param.kind is str:
        # text (per-model: comma-separated), checked when the recipe is built (one-line errors;
        # the allowed choices can differ between methods)
        group.add_argument(param.flag, dest=param.name, default=None, help=text)
    else:
        group.add_argument(param.flag, dest=param.name, type=param.kind, default=None, help=text)


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The merge flags (published names kept: --method, --base_model, --models_to_merge, --save_path)."""
    parser.add_argument("--config", metavar="FILE.yml",
                        help="a mergekit YAML config (merge_method, base_model, models or slices, "
                             "parameters, dtype, out_dtype, tokenizer_source: base, union or a "
                             "model, seed) instead of the method flags; a merged folder's "
                             "merge_recipe.yaml is one")
    parser.add_argument("--method", metavar="NAME",
                        help=f"merge method: {', '.join(sorted(METHODS))} (aliases: "
                             f"{', '.join(f'{a} = {m}' for a, m in sorted(ALIASES.items()))})")
    parser.add_argument("--base_model",
                        help="base (pre-trained) model: local folder or hub id (e.g. "
                             "unsloth/llama-2-13b, or org/name@revision for a branch, tag or "
                             "commit); for 'linear' and 'passthrough' it supplies config and "
                             "tokenizer")
    parser.add_argument("--models_to_merge",
                        help="comma-separated fine-tuned models (folders or hub ids, "
                             "org/name@revision for a hub revision)")
    parser.add_argument("--save_path", required=True,
                        help="output folder; written to a temporary sibling and renamed at the end")
    p = parser.add_argument_group("method parameters (default: the method's mergekit default)")
    for param in declared_params().values():
        _add_param_flag(p, param)
    p.add_argument("--layer_ranges", default=None, metavar="A:B,...",
                   help="passthrough: the decoder layers [A, B) taken from each model, in "
                        "--models_to_merge order, stacked and renumbered from 0 (e.g. "
                        "--models_to_merge M1,M2 --layer_ranges 0:4,2:6 gives 8 layers); "
                        "embeddings come from the first slice's model, the final norm and "
                        "lm_head from the last one's, config.json and tokenizer from --base_model")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of DARE's and DELLA's random masks and of arcee_fusion's mergekit "
                        "sample (per tensor name; default 0)")
    r = parser.add_argument_group("runtime and output")
    r.add_argument("--vocab", choices=VOCAB_MODES, default=None,
                   help="output vocabulary: 'base' (default, what mergekit did for the AIM "
                        "paper) keeps the base's rows and tokenizer and drops fine-tunes' extra "
                        "rows (e.g. an added pad token); 'union' appends every fine-tune's added "
                        "tokens to the base tokenizer, filling rows a model lacks with that "
                        "model's mean row (the AIM repository's WIDEN path)")
    r.add_argument("--device", default="auto",
                   help="where the math runs: auto (cuda if present), cpu, cuda, cuda:N")
    r.add_argument("--dtype", default=None,
                   help="output dtype: bfloat16, float16 or float32 (default: the base's). "
                        "All arithmetic is float32")
    r.add_argument("--max_shard_size", default="5GB",
                   help="largest output shard, e.g. 5GB or 500MB (default 5GB)")
    r.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for the merge math (1 was fastest for this memory-"
                        "bound work on small machines)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty --save_path")


CONFIG_FLAGS = ("method", "base_model", "models_to_merge", "layer_ranges", "seed", "vocab", "dtype")
"""The flags whose settings a --config file holds (with every method parameter's)."""


def method_flags_given(args: argparse.Namespace) -> list[str]:
    """The flags on the command line that a --config file would set, as typed (--density)."""
    dests = [*CONFIG_FLAGS, *declared_params()]
    return [declared_params()[d].flag if d in declared_params() else f"--{d}"
            for d in dests if getattr(args, d, None) is not None]


def recipe_from_args(args: argparse.Namespace) -> MergeRecipe:
    """The recipe merge.py's flags describe (validated as it is built)."""
    missing = [f"--{d}" for d in ("method", "base_model", "models_to_merge") if not getattr(args, d)]
    if missing:
        raise UserError(f"{', '.join(missing)}: required (or give a mergekit YAML with --config)")
    spec = get_method(args.method)
    given = {}
    for name, param in declared_params().items():
        value = getattr(args, name, None)
        if value is not None:   # text of a flag the method lacks stays text: refused as such
            given[name] = param.parse_text(value) if param.per_model and name in spec.params else value
    return MergeRecipe(method=args.method, base_model=args.base_model,
                       models=tuple(m.strip() for m in args.models_to_merge.split(",") if m.strip()),
                       save_path=args.save_path, params=given,
                       seed=0 if args.seed is None else args.seed, vocab=args.vocab or "base",
                       dtype=args.dtype, device=args.device, max_shard_size=args.max_shard_size,
                       overwrite=args.overwrite,
                       layer_ranges=parse_layer_ranges(args.layer_ranges) if args.layer_ranges
                       else None)
