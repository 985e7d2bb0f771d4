"""MergeRecipe: the validated, fully resolved description of one merge (flags -> settings).

Every check on user input happens here, before any checkpoint is opened, so a typo fails in
a second instead of after a download. The resolved recipe (all method parameters with their
defaults filled in) is what the runner executes and what it writes next to the weights.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field

from checkpoints.checkpoint import parse_dtype, parse_size
from checkpoints.errors import UserError
from checkpoints.output import check_output_path
from merging_methods.registry import FLAGS as PARAM_FLAGS
from merging_methods.registry import METHODS, get_method, validate_params

PER_MODEL_PARAMS = ("weights", "density")


@dataclass(frozen=True)
class MergeRecipe:
    method: str
    base_model: str
    models: tuple[str, ...]
    save_path: str
    params: dict = field(default_factory=dict)    # resolved method parameters
    seed: int = 0
    vocab: str = "base"
    dtype: str | None = None                      # output dtype; None = the base's
    device: str = "auto"
    max_shard_size: str = "5GB"
    overwrite: bool = False

    def as_record(self) -> dict:
        return asdict(self)


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The merge flags (published names kept: --method, --base_model, --models_to_merge, --save_path)."""
    parser.add_argument("--method", required=True, metavar="NAME",
                        help=f"merge method: {', '.join(sorted(METHODS))}")
    parser.add_argument("--base_model", required=True,
                        help="base (pre-trained) model: local folder or hub id (e.g. "
                             "unsloth/llama-2-13b); for 'linear' it supplies config and tokenizer")
    parser.add_argument("--models_to_merge", required=True,
                        help="comma-separated fine-tuned models (folders or hub ids)")
    parser.add_argument("--save_path", required=True,
                        help="output folder; written to a temporary sibling and renamed at the end")
    p = parser.add_argument_group("method parameters (default: the method's mergekit default)")
    p.add_argument("--weights", help="per-model multipliers of the task vectors, one value for "
                   "all or one per model, comma-separated; negative subtracts a task vector "
                   "(negation; use with --no-normalize). Default 1.0")
    p.add_argument("--density", help="fraction of each task vector KEPT, in (0, 1]; one value or "
                   "one per model. ties: top-|delta| entries per tensor; dare_*: keep probability "
                   "(drop rate = 1 - density). Default 1.0 = keep all (the AIM paper's setting; "
                   "0.2-0.5 is typical for real TIES/DARE use)")
    p.add_argument("--lambda", dest="scaling", type=float,
                   help="global scale of the merged task vector (default 1.0)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide the merged delta by the sum of the (agreeing) weights. Default: "
                        "on for ties and linear, off otherwise")
    p.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=None,
                   help="DARE: rescale kept entries (default on)")
    p.add_argument("--rescale_mode", choices=["inverse_density", "l1"], default=None,
                   help="DARE rescale: divide by density (DARE paper, default) or match the "
                        "task vector's L1 norm (newer mergekit)")
    p.add_argument("--above_average_value_ratio", type=float, default=None,
                   help="WIDEN t: ranks above t x mean count as important (default 1.0)")
    p.add_argument("--score_calibration_value", type=float, default=None,
                   help="WIDEN s: score given to important entries (default 1.0)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of DARE's random masks (per tensor name; default 0)")
    r = parser.add_argument_group("runtime and output")
    r.add_argument("--vocab", choices=["base", "union"], default="base",
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


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated numbers, got {text!r}")
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"{flag}: expected finite numbers, got {text!r}")
    return values


def recipe_from_args(args: argparse.Namespace) -> MergeRecipe:
    """Validate the flags and resolve every method parameter (defaults filled in)."""
    spec = get_method(args.method)
    models = tuple(m.strip() for m in args.models_to_merge.split(",") if m.strip())
    if not models:
        raise UserError("--models_to_merge: give at least one model (comma-separated)")
    given: dict[str, object] = {}
    for name in PARAM_FLAGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in spec.params:
            raise UserError(f"{PARAM_FLAGS[name]} does not apply to --method {args.method}; "
                            f"it takes {', '.join(PARAM_FLAGS[p] for p in sorted(spec.params))}")
        if name in PER_MODEL_PARAMS:
            value = _floats(value, PARAM_FLAGS[name])
            if len(value) == 1:
                value = value * len(models)
            elif len(value) != len(models):
                raise UserError(f"{PARAM_FLAGS[name]}: {len(value)} values for {len(models)} "
                                "models; give one value or one per model")
        given[name] = value
    params = {**spec.defaults, **given}
    for name in PER_MODEL_PARAMS:
        if name in params and not isinstance(params[name], (list, tuple)):
            params[name] = [float(params[name])] * len(models)
    validate_params(spec, params, len(models))
    if args.dtype is not None:
        parse_dtype(args.dtype)
    parse_size(args.max_shard_size)
    check_output_path(args.save_path, args.overwrite, (*models, args.base_model))
    return MergeRecipe(method=args.method, base_model=args.base_model, models=models,
                       save_path=args.save_path, params=params, seed=args.seed,
                       vocab=args.vocab, dtype=args.dtype, device=args.device,
                       max_shard_size=args.max_shard_size, overwrite=args.overwrite)
