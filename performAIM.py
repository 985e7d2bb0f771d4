"""Activation-Informed Merging on a saved merged model (post-hoc, any merge method).

Example:
    python performAIM.py --merged_model ./TIES_InstructMathCode \
        --pretrained_model_name unsloth/llama-2-13b --omega 0.4 \
        --save_path ./TIES_AIM_InstructMathCode
Offline: add `--calib_data builtin` (or a local .txt/.jsonl file).
"""
from __future__ import annotations

import argparse
import logging

from checkpoints.errors import exit_code_for_user_errors, exit_process


def build_parser() -> argparse.ArgumentParser:
    from aim.pipeline import add_aim_arguments

    parser = argparse.ArgumentParser(
        description="Pull a merged model's weights back toward the base on the input channels "
                    "the base uses most (AIM, arXiv 2502.02421). Streams tensor by tensor.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--merged_model", required=True, help="merged model folder or hub id")
    parser.add_argument("--pretrained_model_name", default="unsloth/llama-2-13b",
                        help="the base model the merge started from (folder or hub id)")
    parser.add_argument("--save_path", required=True,
                        help="output folder; with several omegas, one folder per value "
                             "named SAVE_PATH_omega<value>")
    add_aim_arguments(parser, several_omegas=True)
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=None,
                        help="output dtype (default: the merged checkpoint's); math is float32")
    parser.add_argument("--max_shard_size", default="5GB", help="largest output shard")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    def work() -> int:
        from aim.pipeline import output_paths, relax_checkpoint, settings_from_args
        from checkpoints.checkpoint import parse_dtype, parse_size
        from checkpoints.device import resolve_device
        from checkpoints.output import prepare_output

        args = build_parser().parse_args(argv)
        settings = settings_from_args(args)
        device = resolve_device(args.device)
        if args.dtype:
            parse_dtype(args.dtype)
        parse_size(args.max_shard_size)
        inputs = (args.merged_model, args.pretrained_model_name, settings.stats, settings.calib_data)
        for out in output_paths(args.save_path, settings.omegas):   # fail before calibrating
            prepare_output(out, args.overwrite, inputs)
        written = relax_checkpoint(args.merged_model, args.pretrained_model_name, args.save_path,
                                   settings, device, out_dtype=args.dtype,
                                   max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        for path in written:
            print(f"saved AIM model to {path}")
        return 0

    return exit_code_for_user_errors(work)


if __name__ == "__main__":
    exit_process(main())
