"""Running the study on one zoo: calibrate once, merge, relax, evaluate, keep the records.

Every step calls the project's library in process (`run_merge`, `relax_checkpoint`,
`evaluation.runner.evaluate`), so lm-eval's start-up is paid once per study. Merged and
relaxed models are written to a work folder and deleted after their evaluations unless the
caller keeps them.
"""
from __future__ import annotations

import functools
import gc
import json
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from aim.pipeline import AimSettings, obtain_stats, relax_checkpoint
from checkpoints.errors import UserError
from study.families import TOY, Family
from study.grid import MergeJob, Variant

CALIB_DOC_CHARS = 120  # as toy_ppl's documents: one document fits one 128-token block


@dataclass(frozen=True)
class EvalConfig:
    """How every model is evaluated (recorded in each result file by `evaluate`)."""

    limit: int | None = None   # prompts/documents per benchmark; None: all of them
    batch_size: int = 128
    generation_autocast: str | None = None  # "bfloat16": generation matmuls in bf16 (ppl stays fp32)


@dataclass
class ZooResults:
    """What one zoo's run produced: result records by label and how they relate."""

    name: str
    family: Family = TOY
    population: list[dict] = field(default_factory=list)
    records: dict[str, dict] = field(default_factory=dict)          # merge and variant labels
    jobs: dict[str, MergeJob] = field(default_factory=dict)         # merge label -> job
    variants: dict[str, list[tuple[Variant, str]]] = field(default_factory=dict)  # merge -> rows
    stats_path: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + seconds, 2)


@contextmanager
def fast_lm_eval() -> Iterator[None]:
    """Speed up many small lm-eval runs in one process; results are unchanged.

    lm-eval compiles the Jinja prompt template again for every document (about 2 s of a 5 s
    toy evaluation): compiled templates are cached here. `gc.freeze` moves the objects alive
    now (libraries, task indexes) out of the collector's view, so the full collection after
    each evaluation stops rescanning them.
    """
    import lm_eval.utils as lm_utils

    original = lm_utils.apply_template
    compiled = functools.lru_cache(maxsize=None)(lm_utils.env.from_string)
    lm_utils.apply_template = lambda template, doc: compiled(template).render(**doc)
    gc.freeze()
    try:
        yield
    finally:
        lm_utils.apply_template = original
        gc.unfreeze()


def write_calibration_texts(path: Path, n_docs: int = 256) -> Path:
    """Generic text of the zoo's corpus from a stream of its own (`calib-0`, apart from the
    base's training and toy_ppl streams): the toy analogue of Pile validation text."""
    from toy_zoo import corpus

    rng = random.Random("calib-0")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": corpus.generic_doc(rng, CALIB_DOC_CHARS, 0.0)}) + "\n")
    return path


class ZooRunner:
    """Merges, relaxes and evaluates models of one zoo; records go to `results`."""

    def __init__(self, zoo: Path, out: Path, work: Path, aim: AimSettings, cfg: EvalConfig,
                 progress: Callable[[str], None], total: int, family: Family = TOY):
        self.zoo, self.out, self.work, self.aim, self.cfg = zoo.resolve(), out, work, aim, cfg
        self.progress, self.total, self.done, self.family = progress, total, 0, family
        self.results = ZooResults(out.name, family, stats_path=Path(aim.stats))

    def calibrate(self) -> None:
        """Compute the base's activation statistics once (saved to `aim.stats`)."""
        start = time.time()
        obtain_stats(self.zoo / "base", str(self.zoo / "base"), self.aim, torch.device("cpu"))
        self.results.add_time("calibrate", time.time() - start)
        self.progress(f"calibrated {self.zoo / 'base'} once -> {self.aim.stats} "
                      f"({time.time() - start:.1f} s)")

    def evaluate(self, model: Path, label: str) -> dict:
        """Evaluate one model folder on the zoo's benchmarks and save its result file."""
        from evaluation.results import save_results
        from evaluation.runner import evaluate

        start = time.time()
        record = evaluate(str(model), list(self.family.benchmarks), label=label, backend="hf", device="cpu",
                          dtype="float32", batch_size=self.cfg.batch_size, limit=self.cfg.limit,
                          generation_autocast=self.cfg.generation_autocast,
                          bootstrap_iters=0, tasks_dirs=(str(self.zoo / "tasks"),))
        if record["errors"]:
            raise UserError(f"evaluating {label} failed: {'; '.join(record['errors'].values())}")
        save_results(record, self.out / "results")
        self.results.add_time("evaluate", time.time() - start)
        self.done += 1
        scores = "  ".join(f"{self.family.short(b)} {record['scores'][b]:.3f}" for b in self.family.benchmarks)
        self.progress(f"[{self.done}/{self.total}] {label:44s} {scores}  ({time.time() - start:.1f} s)")
        return record

    def evaluate_population(self) -> None:
        self.results.population = [self.evaluate(self.zoo / name, name) for name in self.family.population]

    def merge(self, job: MergeJob) -> Path:
        """Run `job`'s merge recipe; returns the merged folder."""
        from merging_methods.runner import run_merge

        start = time.time()
        path = run_merge(job.recipe(str(self.zoo), str(self.work / job.label)))
        self.results.add_time("merge", time.time() - start)
        return path

    def relax(self, merged: Path, label: str, mode: str, omegas: tuple[float, ...]) -> list[Path]:
        """AIM (or a control) on a merged folder at several omegas, one read of each tensor."""
        settings = replace(self.aim, omegas=omegas, mode=mode)
        start = time.time()
        paths = relax_checkpoint(str(merged), str(self.zoo / "base"), str(self.work / f"{label}_{mode}"),
                                 settings, torch.device("cpu"), out_dtype=None,
                                 max_shard_size="5GB", overwrite=True)
        self.results.add_time("relax", time.time() - start)
        return paths

    def run_job(self, job: MergeJob, variants: list[Variant], keep: bool) -> None:
        """Merge, evaluate, relax for every variant, evaluate those; delete the folders unless `keep`."""
        merged = self.merge(job)
        self.results.records[job.label] = self.evaluate(merged, job.label)
        rows = []
        for mode in dict.fromkeys(v.mode for v in variants):
            omegas = tuple(v.omega for v in variants if v.mode == mode)
            for omega, path in zip(omegas, self.relax(merged, job.label, mode, omegas)):
                label = Variant(mode, omega).label(job.label)
                self.results.records[label] = self.evaluate(path, label)
                rows.append((Variant(mode, omega), label))
                if not keep:
                    shutil.rmtree(path)
        self.results.jobs[job.label] = job
        self.results.variants[job.label] = rows
        if not keep:
            shutil.rmtree(merged)
