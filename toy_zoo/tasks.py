"""The zoo's benchmarks as lm-eval tasks: toy_instruct, toy_math, toy_code and toy_ppl.

Skill tasks are `generate_until` with greedy decoding, stop at the first newline, metric
`exact_match` (key `exact_match,none`). `toy_ppl` is `loglikelihood_rolling` over held-out
generic documents (`word_perplexity`, `byte_perplexity`, `bits_per_byte`; lower is better).
Data lives in `<zoo>/data/*.jsonl`; the YAMLs in `<zoo>/tasks/` name it by absolute path
(lm-eval resolves relative `data_files` against the current directory), so they are rewritten
whenever the zoo is built or found at a new place. Use
`TaskManager(include_path=<zoo>/tasks, include_defaults=False)`: indexing lm-eval's ~15k
built-in tasks as well takes seconds.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from toy_zoo import corpus

SKILL_TASKS = {"instruct": "toy_instruct", "math": "toy_math", "code": "toy_code"}
PPL_TASK = "toy_ppl"
ALL_TASKS = (*SKILL_TASKS.values(), PPL_TASK)
PPL_DOC_CHARS = 120  # one doc fits one 128-token window after lm-eval's <s> prefix
PPL_METRICS = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
               "bits_per_byte": "bits_per_byte"}  # metric -> lm-eval aggregation


class _Dumper(yaml.SafeDumper):
    """Writes strings with a newline double-quoted ("\\n") instead of folded over lines."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style='"' if "\n" in s else None))


def held_out_docs(n: int, seed: int) -> list[str]:
    """`n` generic documents (no sibling lines) from an RNG stream separate from training's.

    Template lines recur across the corpus (that is what the base learns); documents do not.
    """
    rng = random.Random(f"ppl-{seed}")
    return [corpus.generic_doc(rng, PPL_DOC_CHARS, sibling_share=0.0) for _ in range(n)]


def write_data(data_dir: Path, eval_size: int, ppl_docs: int, seed: int) -> dict[str, list]:
    """Write one jsonl per task; returns the rows by task name (skills: prompt/answer, ppl: text)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {
        task: [{"prompt": p, "answer": a} for p, a in corpus.held_out_prompts(skill, eval_size, seed)]
        for skill, task in SKILL_TASKS.items()
    }
    rows[PPL_TASK] = [{"text": t} for t in held_out_docs(ppl_docs, seed)]
    for task, items in rows.items():
        with open(data_dir / f"{task}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
    return rows


def task_config(task: str, data_file: Path, max_gen_toks: int | None = None) -> dict:
    """The lm-eval config dict of one task reading `data_file` (absolute path)."""
    common = {
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    if task == PPL_TASK:
        return {**common, "output_type": "loglikelihood_rolling", "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False}
                                for m, agg in PPL_METRICS.items()]}
    return {**common, "output_type": "generate_until", "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": max_gen_toks},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}


def write_task_yamls(zoo_dir: Path) -> Path:
    """(Re)write `<zoo>/tasks/*.yaml` for the data in `<zoo>/data`; returns the tasks folder.

    max_gen_toks = longest answer + 4 (room for the newline), so no answer is cut short.
    """
    zoo_dir = Path(zoo_dir).resolve()
    tasks_dir = zoo_dir / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for task in ALL_TASKS:
        data_file = zoo_dir / "data" / f"{task}.jsonl"
        max_gen = None
        if task != PPL_TASK:
            answers = [json.loads(line)["answer"] for line in data_file.read_text().splitlines()]
            max_gen = max(len(a) for a in answers) + 4
        text = "# written by `python -m toy_zoo build`; rewritten when the zoo is built or moved\n" + yaml.dump(
            task_config(task, data_file, max_gen), Dumper=_Dumper, sort_keys=False, width=1000)
        path = tasks_dir / f"{task}.yaml"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return tasks_dir


def evaluate(model_dir: Path, tasks_dir: Path, tasks=ALL_TASKS, batch_size: int = 32,
             limit: int | None = None) -> dict[str, dict]:
    """Run lm-eval (hf backend, float32, CPU) on `model_dir`; returns `results` by task name."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=list(tasks), task_manager=manager, device="cpu",
        batch_size=batch_size, limit=limit, bootstrap_iters=0, log_samples=False,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    return out["results"]


def headline(results: dict[str, dict]) -> dict[str, float]:
    """Skill tasks -> exact_match; toy_ppl -> byte_perplexity (lower is better)."""
    key = {PPL_TASK: "byte_perplexity,none"}
    return {task: float(res[key.get(task, "exact_match,none")]) for task, res in results.items()}
