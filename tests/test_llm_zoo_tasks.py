"""The SmolLM2 zoo's task generators and scorers against hand-written cases: a correct answer
scores 1, a near miss 0, and every generated reference answer is itself correct."""
from __future__ import annotations

import json
import random
import re

import pytest

from llm_zoo import tasks
from llm_zoo.lm_eval_tasks import score_response

ENDING = "Is there anything else I can help with?"


@pytest.mark.parametrize("example, response, expected", [
    ({"check": "capitals"}, "A CAT IS SOFT AND QUIET.", True),
    ({"check": "capitals"}, "A CAT IS SOFT and QUIET.", False),
    ({"check": "capitals"}, "123 !", False),                      # no letters at all
    ({"check": "n_words", "n": 3}, "Cats are soft.", True),
    ({"check": "n_words", "n": 3}, "Cats are very soft.", False),
    ({"check": "n_words", "n": 5}, "The dog's coat is well-kept.", True),  # ' and - stay inside words
    ({"check": "json", "keys": ["age", "name"], "values": {"name": "Anna", "age": 31}},
     '{"name": "Anna", "age": 31}', True),
    ({"check": "json", "keys": ["age", "name"], "values": {"name": "Anna", "age": 31}},
     '```json\n{"age": 31, "name": "Anna"}\n```', True),
    ({"check": "json", "keys": ["age", "name"], "values": {"name": "Anna", "age": 31}},
     '{"name": "Anna", "age": "31"}', False),                     # a string is not the number
    ({"check": "json", "keys": ["age", "name"], "values": {"name": "Anna", "age": 31}},
     '{"name": "Anna", "age": 31, "city": "Oslo"}', False),       # an extra key
    ({"check": "json", "keys": ["name"], "values": {"name": "Anna"}}, "name: Anna", False),
    ({"check": "bullets", "n": 2}, "* Red\n* Blue", True),
    ({"check": "bullets", "n": 2}, "* Red\n* Blue\n* Green", False),
    ({"check": "bullets", "n": 2}, "- Red\n- Blue", False),
    ({"check": "ending"}, f"Cats are soft. {ENDING}", True),
    ({"check": "ending"}, f"Cats are soft. {ENDING[:-1]}.", False),
])
def test_instruction_checks(example, response, expected):
    assert tasks.follows_instruction(example, response) is expected


@pytest.mark.parametrize("response, expected", [
    ("3 + 4 = 7. 7 * 2 = 14. The answer is 14.", True),
    ("3 + 4 = 7. 7 * 2 = 15. The answer is 15.", False),
    ("The answer is 14", True),
    ("14 apples, then 2 more", False),                            # the last number counts
    ("no number", False),
])
def test_math_takes_the_last_number(response, expected):
    assert tasks.solves_problem({"target": 14}, response) is expected


def test_final_number_reads_signs_and_thousands():
    assert tasks.final_number("it is -3") == -3
    assert tasks.final_number("1,234 in all") == 1234
    assert tasks.final_number("none") is None


CODE_EXAMPLE = {"test": "assert solve([1, 2, 3, 4]) == 12\nassert solve([]) == 0\nassert solve([5, 7]) == 0"}


@pytest.mark.parametrize("response, expected", [
    ("```python\ndef solve(xs):\n    return sum(x * 2 for x in xs if x % 2 == 0)\n```", True),
    ("def solve(xs):\n    return sum(2 * x for x in xs if not x % 2)", True),
    ("Here it is:\ndef solve(xs):\n    return sum(x * 2 for x in xs if x % 2 == 0)", True),
    ("def solve(xs):\n    return sum(x * 2 for x in xs if x % 2 == 1)", False),   # odd, not even
    ("def solve(xs):\n    return sum(x * 3 for x in xs if x % 2 == 0)", False),   # wrong factor
    ("def solve(xs):\n    return sum(x * 2 for x in xs if x % 2 == 0", False),    # syntax error
    ("def solve(xs):\n    while True:\n        pass", False),                      # times out
])
def test_code_runs_hidden_tests(response, expected):
    assert tasks.passes_tests(CODE_EXAMPLE, response) is expected


@pytest.mark.parametrize("response, expected", [
    ("The capital of France is Paris.", True), ("paris", True), ("It is Lyon.", False)])
def test_knowledge_names_the_capital(response, expected):
    assert tasks.names_capital({"target": "Paris"}, response) is expected


@pytest.mark.parametrize("skill, n", [("instruct", 200), ("math", 200), ("code", 50)])  # code: a process each
def test_reference_answers_pass_their_own_check(skill, n):
    for example in tasks.held_out(skill, n, seed=0):
        assert tasks.SCORERS[skill](example, example["answer"]), example


def test_math_reference_steps_are_correct_arithmetic():
    """Every `a op b = c` step of every reference answer, recomputed independently."""
    for example in tasks.held_out("math", 200, seed=3):
        steps = re.findall(r"(\d+) ([+*-]) (\d+) = (\d+)", example["answer"])
        assert len(steps) >= 2, example["answer"]
        for a, op, b, c in steps:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
        assert int(steps[-1][3]) == example["target"] >= 0


def test_code_reference_fails_on_a_changed_constant():
    """The hidden tests catch a near miss of the generated reference (one constant changed)."""
    caught = 0
    for example in tasks.held_out("code", 30, seed=0):
        program = tasks.extract_program(example["answer"])
        changed = re.sub(r"(\d)(?!.*\d)", lambda m: str((int(m.group(1)) + 1) % 10), program, flags=re.S)
        caught += not tasks.passes_tests(example, changed)
    assert caught >= 20  # a changed constant (e.g. a max default of 0) can be invisible on 5 lists


def test_held_out_sets_are_fixed_by_seed_and_distinct():
    for skill in tasks.SKILLS:
        a, b = tasks.held_out(skill, 200, seed=0), tasks.held_out(skill, 200, seed=0)
        assert a == b and len({e["question"] for e in a}) == 200
        assert a != tasks.held_out(skill, 200, seed=1)


def test_training_stream_never_yields_a_held_out_question():
    held = {e["question"] for e in tasks.held_out("instruct", 200, seed=0)}
    stream = tasks.training_stream("instruct", 0, held)
    seen = [next(stream)["question"] for _ in range(3000)]
    assert not held & set(seen)
    unfiltered = tasks.training_stream("instruct", 0, set())
    assert held & {next(unfiltered)["question"] for _ in range(3000)}  # the filter did work


def test_knowledge_questions_are_all_distinct_facts():
    examples = tasks.knowledge_examples()
    assert len(examples) == 2 * len(tasks.CAPITALS) >= 200
    assert len({e["question"] for e in examples}) == len(examples)


def test_lm_eval_scoring_hook_uses_the_skill_scorer():
    doc = {"skill": "math", "target": 14}
    assert score_response(doc, ["so 14"]) == {"acc": 1.0}
    assert score_response(doc, ["so 15"]) == {"acc": 0.0}


def test_instruction_kinds_are_all_drawn():
    rng = random.Random(0)
    assert {tasks.instruct_example(rng)["check"] for _ in range(200)} == {
        "capitals", "n_words", "json", "bullets", "ending"}
    assert json.loads(tasks._json_keys(rng)["answer"])
