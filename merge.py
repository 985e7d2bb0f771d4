"""Merge fine-tuned LLMs into one model, streaming tensor by tensor.

Examples:
    python merge.py --method ties --base_model unsloth/llama-2-13b \
        --models_to_merge WizardLMTeam/WizardLM-13B-V1.2,vanillaOVO/WizardMath-13B-V1.0 \
        --density 0.3 --save_path ./TIES_InstructMath
    python merge.py --config merge.yml --save_path ./out      # a mergekit YAML config
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

from checkpoints.errors import exit_code_for_user_errors, exit_process


def build_parser() -> argparse.ArgumentParser:
    from aim.pipeline import add_aim_arguments
    from merging_methods.recipe import add_merge_arguments

    parser = argparse.ArgumentParser(
        description="Merge fine-tunes of one base model (--method, see the list below), "
                    "optionally followed by Activation-Informed Merging (--aim).")
    add_merge_arguments(parser)
    parser.add_argument("--aim", action="store_true",
                        help="apply Activation-Informed Merging to each merged tensor in the same "
                             "pass (same result as performAIM.py on the saved merge)")
    add_aim_arguments(parser, several_omegas=False)
    return parser


def refuse_aim_flags_without_aim(argv: list[str]) -> None:
    """An AIM flag given without --aim would silently give a plain merge: refuse it, also when
    its value equals the default (`--omega 0.4`)."""
    from aim.pipeline import add_aim_arguments
    from checkpoints.errors import UserError

    aim_only = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_aim_arguments(aim_only, several_omegas=False)
    for action in aim_only._actions:
        action.default = argparse.SUPPRESS  # only flags on the command line remain
    given = sorted(vars(aim_only.parse_known_args(argv)[0]))
    if given:
        raise UserError(f"--{given[0]} applies only with --aim; add --aim to relax the merge, or "
                        "drop the flag")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    def work() -> int:
        # numpy's OpenBLAS threads (torch computes with MKL; the merge makes no numpy matrix
        # products) spun ~0.1 s of CPU after numpy's import, beside the merge on a 2-core machine
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        gc.disable()   # torch's import makes ~170K objects; collecting on the way took 0.1 s
        from checkpoints.device import resolve_device
        from checkpoints.errors import UserError
        from merging_methods.recipe import method_flags_given, recipe_from_args
        from merging_methods.runner import run_merge
        from merging_methods.yaml_recipe import recipe_from_config
        # the imports' objects are left out of every later collection: enabled with them in
        # its youngest generation, the collector's first pass walked them all (85 ms)
        gc.freeze()
        gc.enable()

        args = build_parser().parse_args(argv)
        if args.threads < 1:
            raise UserError(f"--threads: must be at least 1, got {args.threads}")
        if not args.aim:
            refuse_aim_flags_without_aim(sys.argv[1:] if argv is None else argv)
        import torch

        torch.set_num_threads(args.threads)
        if args.config:
            given = method_flags_given(args)
            if given:
                raise UserError(f"{given[0]} cannot be combined with --config; set it in "
                                f"{args.config}")
            recipe = recipe_from_config(args.config, save_path=args.save_path, device=args.device,
                                        max_shard_size=args.max_shard_size,
                                        overwrite=args.overwrite)
        else:
            recipe = recipe_from_args(args)
        make_post = None
        if args.aim:
            from aim.pipeline import inline_hook_factory, settings_from_args

            from checkpoints.output import check_output_path

            settings = settings_from_args(args)
            if len(settings.omegas) > 1:
                raise UserError("--omega: merge.py --aim takes one value; use performAIM.py on "
                                "the merged model for several")
            check_output_path(args.save_path, args.overwrite, (settings.stats, settings.calib_data))
            make_post = inline_hook_factory(settings, resolve_device(args.device))
        out = run_merge(recipe, make_post=make_post)
        print(f"saved merged model to {out}")
        return 0

    return exit_code_for_user_errors(work)


if __name__ == "__main__":
    exit_process(main())
