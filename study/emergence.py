"""Do activation-outlier channels emerge in the toy base when it is trained wider, deeper or longer?

Issue 6, approach (1). For each base configuration (`ZooRecipe` overrides), the zoo's own
`train.train_base` trains the base alone; at chosen shares of its steps (0 = the initial weights)
the model is calibrated with the study's recipe (its generic calibration texts, 128-token blocks,
`aim.collect.collect_stats`) and the max / median over input channels of every module's statistic
is measured with the study's `stat_ratios`. Real LLMs have channels tens of times above the median
(`OUTLIER_RATIO`); the question is whether the toy base grows any.

    python -m study.emergence --out study_results/emergence   # ~45 min
    python -m study.emergence --configs zoo "w512:hidden_size=512,intermediate_size=1536,num_heads=16"

Snapshots during training come from global forward hooks on the model's training forward passes,
so the training loop itself is untouched and gives the same weights with or without snapshots.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from statistics import mean, median
from typing import Callable, Iterator

import torch

from checkpoints.errors import UserError, exit_code_for_user_errors
from toy_zoo.train import ZooRecipe

log = logging.getLogger(__name__)

OUTLIER_RATIO = 20.0          # "tens of times the median", as in real LLMs
LOSS_WINDOW = 20              # training losses averaged for a snapshot's loss
CALIB_SEED, CALIB_BATCH = 42, 16
DEFAULT_SNAPSHOTS = (0.0, 0.125, 0.25, 0.5, 1.0)
BASE_FIELDS = ("seed", "hidden_size", "num_layers", "num_heads", "intermediate_size", "block_len",
               "base_steps", "base_lr", "base_batch", "sibling_share", "steps_scale")


def _wide(hidden: int) -> dict:
    return {"hidden_size": hidden, "intermediate_size": 3 * hidden, "num_heads": hidden // 32}


PRESETS: dict[str, dict] = {
    "zoo": {},                                    # the zoo's base: 128 x 2 layers, 450 steps, lr 3e-3
    "lr1e-2": {"base_lr": 1e-2},
    "deep4": {"num_layers": 4},
    "wide256": _wide(256),
    "long8x": {"base_steps": 3600},
    "wide256-long4x": {**_wide(256), "base_steps": 1800},
}


@dataclass(frozen=True)
class BaseConfig:
    """A named base configuration: `ZooRecipe` fields that differ from the zoo's defaults."""

    name: str
    overrides: dict

    def recipe(self) -> ZooRecipe:
        return ZooRecipe(**self.overrides)


def parse_config(spec: str) -> BaseConfig:
    """`NAME` (a preset) or `NAME:FIELD=VALUE,...` with base-training fields of `ZooRecipe`."""
    name, _, body = spec.partition(":")
    if not body:
        if name not in PRESETS:
            raise UserError(f"--configs {spec}: unknown preset; use one of {', '.join(PRESETS)} "
                            "or NAME:FIELD=VALUE,...")
        return BaseConfig(name, PRESETS[name])
    types = {f.name: type(f.default) for f in fields(ZooRecipe)}
    overrides = {}
    for item in body.split(","):
        key, _, value = item.partition("=")
        if key not in BASE_FIELDS or not value:
            raise UserError(f"--configs {spec}: {item!r} is not FIELD=VALUE with FIELD one of "
                            f"{', '.join(BASE_FIELDS)}")
        try:
            overrides[key] = types[key](value)
        except ValueError as err:
            raise UserError(f"--configs {spec}: {key} needs a {types[key].__name__}, got {value!r}") from err
    config = BaseConfig(name, overrides)
    recipe = config.recipe()
    if recipe.hidden_size % recipe.num_heads:
        raise UserError(f"--configs {spec}: hidden_size {recipe.hidden_size} is not a multiple of "
                        f"num_heads {recipe.num_heads}")
    return config


def snapshot_steps(total: int, fractions: tuple[float, ...]) -> list[int]:
    """The distinct optimizer-step counts at `fractions` of `total` steps; the end is always in."""
    return sorted({round(f * total) for f in fractions} | {total})


def ratio_summary(ratios: dict[str, float]) -> dict:
    """Max over modules of max/median (with its module) and the median over modules."""
    top = max(ratios, key=ratios.get)
    return {"max": ratios[top], "max_module": top, "median": median(ratios.values()),
            "modules_at_outlier_ratio": sorted(m for m, r in ratios.items() if r >= OUTLIER_RATIO)}


@dataclass(frozen=True)
class Calibration:
    """The study's calibration blocks and what they were made from (for the stats files)."""

    blocks: torch.Tensor  # [n_blocks, block_len] token ids
    source: str
    samples: int


def calibration(out: Path, samples: int, block_len: int) -> Calibration:
    """The study's generic calibration texts (written to `out/calib.jsonl`), cut like the study does."""
    from calibration.blocks import build_blocks
    from calibration.sources import load_texts
    from study.run import write_calibration_texts
    from toy_zoo.tokenizer import build_tokenizer

    path = write_calibration_texts(out / "calib.jsonl", samples)
    blocks = build_blocks(load_texts(str(path)), build_tokenizer(), n_samples=samples,
                          block_size=block_len, seed=CALIB_SEED)
    return Calibration(blocks, str(path), samples)


def measure(model, calib: Calibration, path: Path, label: str) -> tuple[dict[str, float], dict[str, int]]:
    """Calibrate `model`, save its statistics to `path`; returns max/median and the top channel per module."""
    from aim.collect import collect_stats
    from aim.stats_io import StatsKey, save_stats
    from checkpoints.record import TOOLKIT_VERSION
    from study.tables import stat_ratios, top_channels

    stats = collect_stats(model, calib.blocks, batch_size=CALIB_BATCH, progress=False)
    key = StatsKey(base_fingerprint=label, calib_data=calib.source, calib_samples=calib.samples,
                   block_size=calib.blocks.shape[1], calib_seed=CALIB_SEED, dtype="float32")
    save_stats(path, stats, key, base_model=label, blocks=calib.blocks, toolkit_version=TOOLKIT_VERSION)
    return stat_ratios(path), {m: c[0] for m, c in top_channels(path, 1).items()}


class TrainingWatch:
    """Global-hook target: the losses of the Llama model's training forwards, and a call of
    `snapshot(model, k)` before the forward whose index `k` is in `steps` (weights after k updates)."""

    def __init__(self, steps: list[int], snapshot: Callable[[torch.nn.Module, int], None]):
        from transformers import LlamaForCausalLM

        self.steps, self.snapshot, self.model_class = set(steps), snapshot, LlamaForCausalLM
        self.losses: list[float] = []
        self.forwards = 0

    def _is_training_model(self, module: torch.nn.Module) -> bool:
        return module.training and isinstance(module, self.model_class)

    def before(self, module, args) -> None:
        if not self._is_training_model(module):
            return
        if self.forwards in self.steps:
            module.eval()  # calibration forwards are then ignored by these hooks
            try:
                self.snapshot(module, self.forwards)
            finally:
                module.train()
        self.forwards += 1

    def after(self, module, args, output) -> None:
        if self._is_training_model(module):
            self.losses.append(output.loss.item())

    def recent_loss(self) -> float | None:
        """Mean of the last `LOSS_WINDOW` training losses (None before the first step)."""
        return mean(self.losses[-LOSS_WINDOW:]) if self.losses else None


@contextmanager
def watching(watch: TrainingWatch) -> Iterator[TrainingWatch]:
    """Install `watch` as global forward hooks for the duration; they always come off."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    handles = [register_module_forward_pre_hook(watch.before), register_module_forward_hook(watch.after)]
    try:
        yield watch
    finally:
        for handle in handles:
            handle.remove()


def run_config(config: BaseConfig, calib: Calibration, out: Path, fractions: tuple[float, ...]) -> dict:
    """Train one base with snapshots; returns its record (also written to `out/<name>/result.json`)."""
    from toy_zoo.train import train_base

    recipe, folder = config.recipe(), out / config.name
    shutil.rmtree(folder, ignore_errors=True)  # no stats files of an earlier recipe stay beside the new ones
    total = recipe.steps(recipe.base_steps)
    snapshots: list[dict] = []
    spent = {"calibrate": 0.0}

    def snapshot(model, step: int) -> None:
        start = time.time()
        ratios, top = measure(model, calib, folder / f"stats_step{step}.safetensors", f"{config.name}@{step}")
        spent["calibrate"] += time.time() - start
        snapshots.append({"step": step, "fraction": step / total, "loss": watch.recent_loss(),
                          "summary": ratio_summary(ratios), "ratios": ratios, "top_channel": top})
        log.info("%s step %d/%d: max/median up to %.1f (%s), median over modules %.2f", config.name,
                 step, total, snapshots[-1]["summary"]["max"], snapshots[-1]["summary"]["max_module"],
                 snapshots[-1]["summary"]["median"])

    watch = TrainingWatch(snapshot_steps(total, fractions)[:-1], snapshot)
    start = time.time()
    with watching(watch):
        model = train_base(recipe)
    snapshot(model, total)
    record = {"name": config.name, "overrides": config.overrides, "recipe": recipe.as_dict(),
              "fractions": list(fractions), "calib_samples": calib.samples, "steps": total,
              "params": sum(p.numel() for p in model.parameters()),
              "seconds": {"train": round(time.time() - start - spent["calibrate"], 1),
                          "calibrate": round(spent["calibrate"], 1)},
              "snapshots": snapshots}
    (folder / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def cached_record(config: BaseConfig, out: Path, fractions: tuple[float, ...], samples: int) -> dict | None:
    """A config's earlier record from `out`, if it was made with the same recipe and settings."""
    path = out / config.name / "result.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    wanted = {"recipe": config.recipe().as_dict(), "fractions": list(fractions), "calib_samples": samples}
    same = {k: record.get(k) for k in wanted} == json.loads(json.dumps(wanted))
    return record if same else None


def run_sweep(configs: list[BaseConfig], out: Path, fractions: tuple[float, ...] = DEFAULT_SNAPSHOTS,
              calib_samples: int = 256) -> list[dict]:
    """Every config's record, reusing those already in `out`; one torch thread while it runs."""
    out.mkdir(parents=True, exist_ok=True)
    block_lens = {c.recipe().block_len for c in configs}
    calibs = {n: calibration(out, calib_samples, n) for n in block_lens}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: several times faster than 2 threads on 2 cores
    try:
        records = []
        for config in configs:
            record = cached_record(config, out, fractions, calib_samples)
            if record is None:
                record = run_config(config, calibs[config.recipe().block_len], out, fractions)
            else:
                log.info("%s: reusing %s", config.name, out / config.name / "result.json")
            records.append(record)
    finally:
        torch.set_num_threads(threads)
    return records


def _shape(record: dict) -> str:
    r = record["recipe"]
    return f"{r['hidden_size']}x{r['num_layers']}, {record['steps']} steps, lr {r['base_lr']:g}"


def verdict(records: list[dict]) -> str:
    """One sentence: which configs' final bases have a module at max/median >= `OUTLIER_RATIO`."""
    from study.tables import short_module

    final = {r["name"]: r["snapshots"][-1]["summary"] for r in records}
    hits = [f"{name} ({', '.join(map(short_module, s['modules_at_outlier_ratio']))})"
            for name, s in final.items() if s["modules_at_outlier_ratio"]]
    if hits:
        return f"Outlier channels (max/median >= {OUTLIER_RATIO:g}) appeared in: {'; '.join(hits)}."
    name = max(final, key=lambda n: final[n]["max"])
    return (f"No configuration grew outlier channels (max/median >= {OUTLIER_RATIO:g}) in any module; "
            f"the largest at the end of training was {final[name]['max']:.1f} ({name}, "
            f"{short_module(final[name]['max_module'])}).")


def markdown(records: list[dict], header: str) -> str:
    """Summary per config (final weights), the trend over training, and every module's ratio."""
    from study.tables import short_module, stats_markdown

    def loss(s: dict) -> str:
        return "-" if s["loss"] is None else f"{s['loss']:.3f}"

    summary = ["| config | base | params | train loss | max/median: max over modules | that module "
               "(top channel) | median over modules | train s |", "|---|---|---|---|---|---|---|---|"]
    trend = ["| config | step | share | train loss | max over modules | that module | median over modules |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        end = r["snapshots"][-1]
        s = end["summary"]
        summary.append(f"| {r['name']} | {_shape(r)} | {r['params']:,} | {loss(end)} | {s['max']:.1f} | "
                       f"{short_module(s['max_module'])} ({end['top_channel'][s['max_module']]}) | "
                       f"{s['median']:.2f} | {r['seconds']['train']:.0f} |")
        for snap in r["snapshots"]:
            t = snap["summary"]
            trend.append(f"| {r['name']} | {snap['step']} | {snap['fraction']:.3g} | {loss(snap)} | "
                         f"{t['max']:.1f} | {short_module(t['max_module'])} | {t['median']:.2f} |")
    per_module = stats_markdown({r["name"]: r["snapshots"][-1]["ratios"] for r in records})
    return "\n\n".join([header, verdict(records), "## Final weights, per config", "\n".join(summary),
                        "## During training (step 0 = initial weights)", "\n".join(trend),
                        "## Per module, final weights", per_module]) + "\n"


def build_parser() -> argparse.ArgumentParser:
    e = argparse.ArgumentParser(prog="python -m study.emergence", description=__doc__.splitlines()[0])
    e.add_argument("--out", type=Path, default=Path("study_results/emergence"),
                   help="folder for emergence.md, emergence.json and per-config stats/results")
    e.add_argument("--configs", nargs="+", default=None, metavar="NAME[:FIELD=VALUE,...]",
                   help="presets (default: all of them) or NAME:FIELD=VALUE,... with ZooRecipe base fields")
    e.add_argument("--snapshots", default="0,0.125,0.25,0.5,1",
                   help="comma-separated shares of the training steps to measure at (0: initial weights)")
    e.add_argument("--calib-samples", type=int, default=256, help="calibration documents")
    return e


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(sorted({float(v) for v in text.split(",")}))
    except ValueError as err:
        raise UserError(f"--snapshots {text}: give comma-separated numbers such as 0,0.25,0.5,1") from err
    if any(not 0 <= v <= 1 for v in values):
        raise UserError(f"--snapshots {text}: every share must be between 0 and 1")
    return values


def _emergence(args) -> int:
    import platform
    import shlex

    if args.calib_samples < 1:
        raise UserError(f"--calib-samples must be at least 1, got {args.calib_samples}")
    specs = args.configs or list(PRESETS)
    configs = [parse_config(spec) for spec in specs]
    fractions = _fractions(args.snapshots)
    if len({c.name for c in configs}) < len(configs):
        raise UserError("--configs: every config needs its own NAME")
    start = time.time()
    records = run_sweep(configs, args.out, fractions, args.calib_samples)
    env = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, "threads": 1}
    header = (f"# Do outlier channels emerge in the toy base? (issue 6, approach 1)\n\n"
              f"Statistic: AIM's per-input-channel statistic of each module (sum over the study's 128-token "
              f"calibration blocks of the mean |input|), reported as max / median over channels.  \n"
              f"Command: `python -m study.emergence --configs {' '.join(shlex.quote(s) for s in specs)} "
              f"--snapshots {args.snapshots}` (presets in study/emergence.py)  \n"
              f"Machine: {env['cpus']} CPU cores, {env['platform']}, torch {env['torch']}, 1 thread; "
              f"this run {time.time() - start:.0f} s (configs reused from earlier runs count 0).")
    text = markdown(records, header)
    (args.out / "emergence.md").write_text(text)
    (args.out / "emergence.json").write_text(json.dumps({"environment": env, "configs": records}, indent=2) + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return exit_code_for_user_errors(lambda: _emergence(args))


if __name__ == "__main__":
    raise SystemExit(main())
