"""The SmolLM2 zoo's benchmarks as lm-eval tasks, scored by `llm_zoo.tasks`.

  smollm2_instruct, smollm2_math, smollm2_code, smollm2_knowledge: `generate_until`, greedy,
      the question rendered through the base's chat template (stored in the data, so every
      model of the family sees exactly the prompt the experts were trained on); metric `acc`
      = share of prompts whose answer passes the skill's check
  smollm2_ppl: `loglikelihood_rolling` over held-out prose (`word_perplexity`, lower is better)

The YAMLs live in `<zoo>/tasks/` beside a small `smollm2_scoring.py` that lm-eval loads through
`!function`; it puts this repository on `sys.path` and forwards to `score_response`. Data paths
are absolute (lm-eval resolves relative ones against the current directory), so the YAMLs are
rewritten whenever the zoo is built or found at a new place.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from llm_zoo import tasks

PREFIX = "smollm2_"
SKILL_TASKS = {skill: PREFIX + skill for skill in (*tasks.SKILLS, "knowledge")}
PPL_TASK = PREFIX + "ppl"
ALL_TASKS = (*SKILL_TASKS.values(), PPL_TASK)
MAX_GEN_TOKS = {"instruct": 64, "math": 64, "code": 96, "knowledge": 32}
SCORING_MODULE = "smollm2_scoring"
REPO_ROOT = Path(__file__).resolve().parents[1]


def score_response(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval `process_results`: 1.0 when the model's answer passes the doc's check."""
    return {"acc": float(tasks.SCORERS[doc["skill"]](doc, results[0]))}


def task_config(task: str, data_file: Path, skill: str | None) -> dict:
    """The lm-eval config of one task reading `data_file` (absolute path)."""
    common = {"task": task, "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
              "num_fewshot": 0, "metadata": {"version": 1.0}}
    if skill is None:
        return {**common, "output_type": "loglikelihood_rolling", "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [{"metric": m, "aggregation": "weighted_perplexity", "higher_is_better": False}
                                for m in ("word_perplexity", "byte_perplexity")]}
    return {**common, "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "",
            "target_delimiter": "", "unsafe_code": skill == "code",
            "process_results": f"!function {SCORING_MODULE}.process_results",
            "generation_kwargs": {"until": ["<|im_end|>", "<|im_start|>"], "do_sample": False,
                                  "max_gen_toks": MAX_GEN_TOKS[skill]},
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def _yaml_text(config: dict) -> str:
    """YAML with the `!function` tag kept as a tag (lm-eval resolves it at load time)."""
    text = yaml.safe_dump(config, sort_keys=False, width=1000)
    return text.replace(f"'!function {SCORING_MODULE}.process_results'",
                        f"!function {SCORING_MODULE}.process_results")


def write_task_files(zoo: Path) -> Path:
    """(Re)write `<zoo>/tasks/` for the data in `<zoo>/data`; returns the tasks folder."""
    zoo = Path(zoo).resolve()
    folder = zoo / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    shim = (f'"""Written by the SmolLM2 zoo build: lm-eval loads this file by path."""\n'
            f"import sys\n\nsys.path.insert(0, {str(REPO_ROOT)!r})\n"
            f"from llm_zoo.lm_eval_tasks import score_response as process_results  # noqa: E402,F401\n")
    files = {f"{SCORING_MODULE}.py": shim}
    for skill, task in SKILL_TASKS.items():
        files[f"{task}.yaml"] = _yaml_text(task_config(task, zoo / "data" / f"{task}.jsonl", skill))
    files[f"{PPL_TASK}.yaml"] = _yaml_text(task_config(PPL_TASK, zoo / "data" / f"{PPL_TASK}.jsonl", None))
    for name, text in files.items():
        path = folder / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return folder


def write_data(data_dir: Path, rows: dict[str, list[dict]]) -> None:
    """One jsonl per task name in `rows`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for task, items in rows.items():
        tmp = data_dir / f".{task}.jsonl.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
        tmp.replace(data_dir / f"{task}.jsonl")  # a new file: never writes through a hard link
