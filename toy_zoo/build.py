"""Build the toy zoo folder: base, three experts, benchmark data and lm-eval task YAMLs.

Layout of `<out>/`: `base/`, `expert_instruct/`, `expert_math/`, `expert_code/` (HF model
folders: LlamaForCausalLM safetensors, config, generation config, tokenizer), `data/*.jsonl`,
`tasks/*.yaml` and `zoo.json` (format version + recipe = the fingerprint, plus build info:
seconds, torch version and the CPU kernel set torch dispatched to, e.g. AVX512).
A zoo whose fingerprint matches is reused; otherwise it is rebuilt in `<out>.partial` and
swapped in, so an interrupted build never leaves a half zoo behind. `<out>.partial` is marked
with `building.json` the moment it is made: a rebuild deletes only a staging folder so marked
(or an empty one), never a folder of the user's that happens to carry that name.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from checkpoints.output import check_output_path
from toy_zoo import corpus, tasks, train
from toy_zoo.outliers import plant_outlier_channels
from toy_zoo.tokenizer import save_tokenizer

log = logging.getLogger(__name__)
ZOO_FORMAT = 1  # bump when generators or training code change the zoo for the same recipe
ZOO_FILE = "zoo.json"
STAGE_FILE = "building.json"  # marks `<out>.partial` as this builder's staging folder
EXPERTS = {skill: f"expert_{skill}" for skill in corpus.SKILLS}
MODEL_DIRS = ("base", *EXPERTS.values())


def fingerprint(recipe: train.ZooRecipe) -> dict:
    return {"format": ZOO_FORMAT, "recipe": recipe.as_dict()}


def is_current(out: Path, recipe: train.ZooRecipe) -> bool:
    """True when `out` holds a complete zoo built from `recipe` with this code's format."""
    meta = Path(out) / ZOO_FILE
    if not meta.is_file():
        return False
    stored = json.loads(meta.read_text())
    same = {k: stored.get(k) for k in ("format", "recipe")} == json.loads(json.dumps(fingerprint(recipe)))
    complete = all((Path(out) / d / "model.safetensors").is_file() for d in MODEL_DIRS)
    return same and complete


def outlier_channels(recipe: train.ZooRecipe) -> list[int]:
    """The hidden channels planted as outliers, fixed by the seed."""
    rng = random.Random(f"outliers-{recipe.seed}")
    return sorted(rng.sample(range(recipe.hidden_size), recipe.outlier_count))


def save_model(model, out_dir: Path, recipe: train.ZooRecipe) -> None:
    model.save_pretrained(out_dir)
    save_tokenizer(out_dir, model_max_length=recipe.block_len)


@contextmanager
def _training_bar(recipe: train.ZooRecipe) -> Iterator[tqdm]:
    """One progress bar over every training step of the zoo (on stderr), with transformers'
    per-save "Writing model shards" bars silenced meanwhile."""
    from transformers.utils import logging as hf_logging

    shard_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tqdm(total=recipe.total_steps(), unit="step", mininterval=1.0, dynamic_ncols=True) as bar:
            yield bar
    finally:
        if shard_bars:
            hf_logging.enable_progress_bar()


def _build_into(stage: Path, recipe: train.ZooRecipe, bar: tqdm) -> dict:
    """Train and write everything into `stage`; returns the build info for zoo.json."""
    rows = tasks.write_data(stage / "data", recipe.eval_size, recipe.ppl_docs, recipe.seed)
    base = train.train_base(recipe, bar)
    info: dict = {}
    if recipe.outliers:
        info["outlier_channels"] = outlier_channels(recipe)
        base = plant_outlier_channels(base, info["outlier_channels"], recipe.outlier_factor)
    save_model(base, stage / "base", recipe)
    for skill, steps in recipe.expert_steps:
        held_out = {r["prompt"] for r in rows[tasks.SKILL_TASKS[skill]]}
        expert = train.finetune_expert(base, skill, steps, recipe, held_out, bar)
        save_model(expert, stage / EXPERTS[skill], recipe)
    return info


def build_zoo(out: Path, recipe: train.ZooRecipe) -> Path:
    """Build the zoo at `out` (replacing an older zoo there); returns `out`."""
    out = Path(out)
    stage = out.with_name(out.name + ".partial")
    # Both folders are deleted or replaced below: each must be new, empty or ours (its marker
    # file), and neither may be the working directory or one of its parents.
    check_output_path(out, True, flag="--out", marker=ZOO_FILE)
    check_output_path(stage, True, flag="--out's staging folder", marker=STAGE_FILE)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    (stage / STAGE_FILE).write_text(json.dumps(fingerprint(recipe)) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 cores, 2 threads were several times slower than 1
    start = time.time()
    try:
        with _training_bar(recipe) as bar:
            info = _build_into(stage, recipe, bar)
    finally:
        torch.set_num_threads(threads)
    # weights are bit-identical only between builds on the same kernel set (README: toy zoo)
    info.update(seconds=round(time.time() - start, 1), torch=torch.__version__,
                cpu_capability=torch.backends.cpu.get_cpu_capability())
    (stage / ZOO_FILE).write_text(json.dumps({**fingerprint(recipe), "built": info}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    stage.rename(out)
    (out / STAGE_FILE).unlink()
    tasks.write_task_yamls(out)
    log.info("built zoo %s in %.0f s", out, info["seconds"])
    return out


def ensure_zoo(out: Path, recipe: train.ZooRecipe) -> bool:
    """Build the zoo unless `out` already holds it; returns True when it built. Task YAMLs
    are refreshed either way, so a moved zoo keeps valid absolute data paths."""
    if is_current(out, recipe):
        tasks.write_task_yamls(out)
        log.info("zoo %s is up to date (same recipe); skipping the build", out)
        return False
    build_zoo(out, recipe)
    return True
