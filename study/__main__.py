"""The offline AIM study on the toy zoo, end to end, in one command.

    python -m study --quick              # one method, one combination (make demo)
    python -m study                      # full grid on zoo/ (built first if needed)
    python -m study --outliers           # also the ablation on the outlier zoo (zoo_outliers/)
    python -m study --zoo smollm2        # the real SmolLM2-135M zoo (zoo_smollm2/, llm_zoo)

Building zoo/ takes 4-10 min on one CPU thread (a progress bar counts its steps); the README
gives measured timings of each command.

Builds the zoo if needed, calibrates the base once, merges every method on every 2- and
3-expert combination (weight 1.0 = the AIM paper's setting, and a tuned weight), applies AIM
at omega 0.4, runs AIM and its controls (channel_blind, uniform) over an omega sweep on the
merges of --sweep-sizes experts, evaluates everything in process, and writes the tables,
plots and result files into --out (study.md holds every table) and lists them at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack, redirect_stderr
from dataclasses import replace
from pathlib import Path

from checkpoints.errors import UserError, exit_code_for_user_errors

MARKER = "study.json"
UNSET = None  # argparse default of the flags whose default depends on the zoo family
DEFAULTS = {"weights": (1.0, 0.7), "sweep_sizes": (2, 3), "sweep_methods": None,
            "dare_seed_sizes": None, "limit": None, "batch_size": 128, "threads": 1}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    from study.grid import METHODS

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The module docstring as written, and every flag's default."""

    p = argparse.ArgumentParser(prog="python -m study", description=__doc__,
                                formatter_class=Formatter)
    p.add_argument("--quick", action="store_true",
                   help="task_arithmetic on the 3-expert merge only, omegas 0.2 and 0.4")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder; unset (%(default)s): study_out/quick with --quick, "
                        "else study_out/full")
    p.add_argument("--zoo", default="toy",
                   help="zoo family: toy (folder zoo/) or smollm2 (folder zoo_smollm2/, the real "
                        "SmolLM2-135M and its experts); or the folder of a toy zoo (built if missing)")
    p.add_argument("--dare-seeds", type=_ints, default=(0, 1),
                   help="mask seeds of the DARE merges (each seed is its own merge)")
    p.add_argument("--dare-seed-sizes", type=_ints, default=UNSET,
                   help="merge sizes (experts) that get every --dare-seeds seed, the others only "
                        "the first; unset: every size (smollm2: 3)")
    p.add_argument("--outliers", action="store_true",
                   help="also run the ablation on the zoo whose base has planted outlier channels")
    p.add_argument("--outlier-zoo", type=Path, default=Path("zoo_outliers"),
                   help="outlier zoo folder (built if missing)")
    p.add_argument("--seed", type=int, default=None,
                   help="zoo seed; unset: an existing zoo's own, else 0 (a zoo built with another "
                        "seed or --steps-scale is rebuilt)")
    p.add_argument("--steps-scale", type=float, default=None,
                   help="zoo training steps multiplier; unset: an existing zoo's own, else 1.0")
    p.add_argument("--methods", type=_names, default=METHODS, help="comma-separated merge methods")
    p.add_argument("--weights", type=_floats, default=UNSET,
                   help="per-expert weight regimes for methods whose result scales with the "
                        "weight (1.0 = the AIM paper's setting); unset: toy 1.0,0.7, smollm2 0.3")
    p.add_argument("--density", type=float, default=0.5,
                   help="density (fraction kept) for TIES and DARE; 1 = the paper's released "
                        "config, which makes dare_linear identical to task_arithmetic")
    p.add_argument("--omega", type=float, default=0.4, help="AIM omega of the main table")
    p.add_argument("--hv-margin", type=float, default=0.1,
                   help="HV reference point this many population ranges below the worst "
                        "population score on each skill (0: a merge at the population's floor "
                        "on any skill, e.g. every 2-expert merge on the third skill, adds 0)")
    p.add_argument("--sweep", type=_floats, default=(0.2, 0.6),
                   help="omegas of the ablation sweep")
    p.add_argument("--merge-sizes", type=_ints, default=(2, 3),
                   help="merge sizes (experts per merge) in the grid, e.g. 3 for the 3-expert merges only")
    p.add_argument("--sweep-sizes", type=_ints, default=UNSET,
                   help="merge sizes (experts) that get the sweep and the controls; unset: toy "
                        "2,3, smollm2 3")
    p.add_argument("--sweep-methods", type=_names, default=UNSET,
                   help="methods whose merges get the sweep and the controls; unset: toy every "
                        "method, smollm2 task_arithmetic,ties")
    p.add_argument("--calib-samples", type=int, default=256, help="calibration documents")
    p.add_argument("--limit", type=int, default=UNSET,
                   help="prompts/documents per benchmark; unset: toy all of the zoo's, smollm2 64")
    p.add_argument("--batch-size", type=int, default=UNSET,
                   help="evaluation batch size; unset: toy 128, smollm2 64")
    p.add_argument("--generation-dtype", choices=("float32", "bfloat16"), default=None,
                   help="matmul dtype of greedy generation (weights and perplexity stay float32); "
                        "unset: the family's (toy float32, smollm2 bfloat16)")
    p.add_argument("--threads", type=int, default=UNSET,
                   help="torch threads; unset: toy 1 (fastest for its tiny models on 2 cores), "
                        "smollm2 2")
    p.add_argument("--keep-models", action="store_true",
                   help="keep merged and AIM models under OUT/<zoo>/models instead of deleting them")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier study in --out")
    p.add_argument("--verbose", action="store_true", help="show library logs and progress bars")
    return p


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"--out {out}: exists and is not a study folder; choose a new folder")
        if not overwrite:
            raise UserError(f"--out {out}: holds an earlier study; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"status": "running"}) + "\n")


def _zoo_choice(text: str):
    """(family, folder) of `--zoo`: a family name, or the folder of a toy zoo."""
    from study.families import FAMILIES, TOY

    family = FAMILIES.get(text)
    return (family, family.default_dir) if family else (TOY, Path(text))


def _apply_family_defaults(args: argparse.Namespace) -> None:
    """Give the flags left unset the zoo family's defaults (DEFAULTS where it has none)."""
    family, _ = _zoo_choice(args.zoo)
    own = dict(family.study_defaults)
    for dest, value in DEFAULTS.items():
        if getattr(args, dest) is UNSET:
            setattr(args, dest, own.get(dest, value))


def _plans(args) -> dict[str, tuple]:
    """{output name: (family, zoo folder, [(job, variants)])} for the zoos this run covers."""
    from study.families import TOY
    from study.grid import METHODS, SKILLS, combinations, study_plan

    methods = ("task_arithmetic",) if args.quick else args.methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods: {', '.join(unknown) or 'none given'}; choose from "
                        f"{', '.join(METHODS)}")
    if not set(args.merge_sizes) <= {2, 3}:
        raise UserError(f"--merge-sizes: choose from 2 and 3, got {args.merge_sizes}")
    combos = [SKILLS] if args.quick else combinations(sizes=args.merge_sizes)
    weights, sweep = ((1.0,), (0.2,)) if args.quick else (args.weights, args.sweep)
    if not weights or not all(w > 0 for w in weights):
        raise UserError(f"--weights: give one or more positive values, got {args.weights}")
    if not all(0.0 <= w <= 1.0 for w in (*sweep, args.omega)):
        raise UserError("--omega and --sweep: values must be in [0, 1]")
    common = dict(methods=methods, weights=weights, density=args.density, omega=args.omega,
                  sweep=sweep, sweep_sizes=(3,) if args.quick else args.sweep_sizes, combos=combos,
                  seeds=args.dare_seeds[:1] if args.quick else args.dare_seeds,
                  sweep_methods=None if args.quick else args.sweep_methods,
                  seed_sizes=None if args.quick else args.dare_seed_sizes)
    family, zoo = _zoo_choice(args.zoo)
    if args.outliers and family is not TOY:
        raise UserError(f"--outliers: the outlier zoo is a toy zoo; drop it or use --zoo toy")
    plans = {"zoo" if family is TOY else family.name: (family, zoo, study_plan(**common))}
    if args.outliers:
        plans["zoo_outliers"] = (TOY, args.outlier_zoo, study_plan(**common, only_swept=True))
    return plans


def _zoo_recipe(zoo: Path, args, outliers: bool, like=None):
    """The recipe to ensure for `zoo`. With no recipe flag: an existing zoo's own recipe (so it
    is reused as built), else `like` (the main zoo's) with the outlier flag set; with flags:
    the full recipe they give. An outlier zoo folder must hold an outlier zoo."""
    from toy_zoo.build import ZOO_FILE
    from toy_zoo.train import ZooRecipe

    meta = zoo / ZOO_FILE
    if args.seed is not None or args.steps_scale is not None:
        return ZooRecipe(seed=args.seed or 0, steps_scale=args.steps_scale or 1.0, outliers=outliers)
    if meta.is_file():
        stored = json.loads(meta.read_text()).get("recipe", {})
        stored["expert_steps"] = tuple(tuple(step) for step in stored.get("expert_steps", ()))
        try:
            recipe = ZooRecipe(**stored)
        except TypeError:  # written by another version of the builder: rebuild
            recipe = None
        if recipe is not None:
            if outliers and not recipe.outliers:
                raise UserError(f"--outlier-zoo {zoo}: holds a zoo without outlier channels; "
                                "pass another folder (it is built there)")
            return recipe
    return replace(like, outliers=outliers) if like is not None else ZooRecipe(outliers=outliers)


def _ensure_zoos(args, plans, say) -> float:
    from study.families import SMOLLM2
    from toy_zoo.build import ensure_zoo

    start = time.time()
    main_recipe = None
    for name, (family, zoo, _) in plans.items():
        if family is SMOLLM2:
            from llm_zoo.build import ZooRecipe as SmolRecipe
            from llm_zoo.build import ensure_zoo as ensure_smollm2_zoo

            say(f"zoo {zoo}: checking (building it if needed takes about 40 min on 2 cores)")
            built = ensure_smollm2_zoo(zoo, SmolRecipe(seed=args.seed or 0))
            say(f"zoo {zoo}: {'built' if built else 'up to date'}")
            continue
        say(f"zoo {zoo}: checking (building it if needed takes 4-10 min)")
        recipe = _zoo_recipe(zoo, args, outliers=name == "zoo_outliers", like=main_recipe)
        built = ensure_zoo(zoo, recipe)
        main_recipe = main_recipe or recipe
        say(f"zoo {zoo}: {'built' if built else 'up to date'}")
    return time.time() - start


def _run_zoo(name: str, family, zoo: Path, plan: list, args, say, work_root: Path):
    from aim.pipeline import AimSettings
    from study.run import EvalConfig, ZooRunner

    out = args.out / name
    calib, block_size = family.calibration(zoo, out)
    aim = AimSettings(calib_data=str(calib), calib_samples=args.calib_samples,
                      block_size=block_size, stats=str((out / "stats.safetensors").resolve()))
    total = len(family.population) + sum(1 + len(v) for _, v in plan)
    work = out / "models" if args.keep_models else work_root / name
    work.mkdir(parents=True, exist_ok=True)
    dtype = args.generation_dtype or family.generation_autocast or "float32"
    config = EvalConfig(args.limit, args.batch_size, None if dtype == "float32" else dtype)
    runner = ZooRunner(zoo, out, work, aim, config, say, total, family)
    say(f"== {name}: {len(plan)} merges, {total} evaluations")
    runner.calibrate()
    runner.evaluate_population()
    for job, variants in plan:
        runner.run_job(job, variants, keep=args.keep_models)
    return runner.results


def _write_zoo(res, zoo: Path, out: Path, omega: float, hv_margin: float) -> tuple[dict, dict]:
    """Tables and plots of one zoo; returns its markdown sections and its summary."""
    from study.plots import omega_sweep_plot, pareto_plot
    from study.tables import (ablation_markdown, aim_effect_markdown, control_summary_markdown,
                              main_table, planted_line, scores_markdown, stat_ratios, sweep_points,
                              top_channels)
    from toy_zoo.build import ZOO_FILE

    table = main_table(res, omega, hv_margin)
    where = res.name if zoo.name == res.name else f"{res.name} ({zoo})"
    pareto_plot(table, res.family, f"{where}: skill mean vs perplexity, merges without and with AIM "
                       f"(ω = {omega:g})", out / "pareto.png")
    points = sweep_points(res)
    if points:
        omega_sweep_plot(points, res.family, f"{res.name}: AIM and controls vs omega",
                         out / "omega_sweep.png")
    sections = {"table": table.markdown(), "effect": aim_effect_markdown(res, table, omega),
                "ablation": ablation_markdown(res), "controls": control_summary_markdown(res),
                "scores": scores_markdown(res)}
    for key, text in sections.items():
        (out / f"{key}.md").write_text(text + "\n")
    planted = json.loads((zoo / ZOO_FILE).read_text()).get("built", {}).get("outlier_channels")
    top = top_channels(res.stats_path, len(planted) if planted else 4)
    summary = {"stat_ratios": stat_ratios(res.stats_path), "top_channels": top,
               "planted_channels": planted, "seconds": res.seconds,
               "scores": {r["label"]: r["scores"] for r in [*res.population, *res.records.values()]}}
    if planted:
        summary["planted_line"] = planted_line(top, planted)
    return sections, summary


def _markdown(summary: dict, sections: dict, omega: float) -> str:
    from study.tables import stats_markdown

    env = summary["environment"]
    parts = [f"# AIM study\n\nCommand: `{summary['command']}`  \n"
             f"Machine: {env['cpus']} CPU cores, {env['platform']}, torch threads {env['threads']}  \n"
             f"Time: {summary['seconds']['total']:.0f} s in all (zoo check/build "
             f"{summary['seconds']['zoo']:.0f} s, study {summary['seconds']['study']:.0f} s)"]
    for name, s in sections.items():
        parts += [f"## {name}: merges without and with AIM (ω = {omega:g})", s["table"],
                  f"### {name}: AIM effect by method, weight and merge size", s["effect"],
                  f"### {name}: ablation (skill mean / perplexity per ω)", s["ablation"],
                  f"### {name}: AIM minus control at equal ω", s["controls"],
                  f"### {name}: every score, pass/fail rates ± 1 standard error", s["scores"]]
    ratios = {name: zoo["stat_ratios"] for name, zoo in summary["zoos"].items()}
    parts += ["## Base activation statistic per module: max / median over input channels",
              stats_markdown(ratios)]
    parts += [f"{name}: {zoo['planted_line']}" for name, zoo in summary["zoos"].items()
              if "planted_line" in zoo]
    return "\n\n".join(parts) + "\n"


def where_written(out: Path, zoos: list[str]) -> str:
    """The closing lines: where the tables, plots and result files are."""
    lines = [f"results in {out}/:", f"  {out / 'study.md'}  every table (also printed above)"]
    for name in zoos:
        folder = out / name
        lines += [f"  {folder}/table.md, effect.md, ablation.md, controls.md, scores.md  tables of {name}",
                  f"  {folder}/pareto.png, omega_sweep.png  plots of {name}",
                  f"  {folder}/results/*.json  one result file per evaluated model"]
    return "\n".join(lines)


def _run_zoos(args, plans, say) -> dict:
    """Every zoo's plan, with lm-eval sped up, library noise silenced (unless --verbose) and
    a temporary work folder for the models."""
    with ExitStack() as stack:
        work_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aim-study-")))
        if not args.verbose:
            stack.enter_context(redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
            for noisy in map(logging.getLogger, ("lm_eval", "transformers", "datasets")):
                stack.callback(noisy.setLevel, noisy.level)
                noisy.setLevel(logging.ERROR)
        from study.run import fast_lm_eval

        stack.enter_context(fast_lm_eval())
        return {name: _run_zoo(name, family, zoo, plan, args, say, work_root)
                for name, (family, zoo, plan) in plans.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _apply_family_defaults(args)
    args.out = args.out or Path("study_out") / ("quick" if args.quick else "full")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    def say(line: str) -> None:
        print(line, flush=True)

    def work() -> int:
        import torch

        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        started = time.time()
        plans = _plans(args)
        _prepare_out(args.out, args.overwrite)
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            zoo_seconds = _ensure_zoos(args, plans, say)
            study_start = time.time()
            results = _run_zoos(args, plans, say)
        finally:
            torch.set_num_threads(threads)
        written = {n: _write_zoo(r, plans[n][1], args.out / n, args.omega, args.hv_margin)
                   for n, r in results.items()}
        summary = {"status": "done", "command": " ".join(["python -m study", *(argv or sys.argv[1:])]),
                   "environment": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                   "threads": args.threads},
                   "zoos": {n: w[1] for n, w in written.items()},
                   "seconds": {"zoo": round(zoo_seconds, 1),
                               "study": round(time.time() - study_start, 1),
                               "total": round(time.time() - started, 1)}}
        text = _markdown(summary, {n: w[0] for n, w in written.items()}, args.omega)
        (args.out / "study.md").write_text(text)
        (args.out / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
        say(text)
        say(where_written(args.out, list(written)))
        return 0

    return exit_code_for_user_errors(work)


if __name__ == "__main__":
    raise SystemExit(main())
