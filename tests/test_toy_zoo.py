"""Toy zoo: corpus rules, tokenizer round trip, outlier planting, a CI-size build and lm-eval tasks."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from checkpoints.errors import UserError
from tests.tiny_models import llama_config
from toy_zoo import __main__ as cli
from toy_zoo import corpus, tasks
from toy_zoo.build import EXPERTS, MODEL_DIRS, STAGE_FILE, ZOO_FILE, build_zoo, ensure_zoo, is_current
from toy_zoo.outliers import plant_outlier_channels
from toy_zoo.tokenizer import encode, save_tokenizer
from toy_zoo.train import ZooRecipe, train_base

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY_ARGS = ["--preset", "ci", "--steps-scale", "0.05", "--eval-size", "4", "--ppl-docs", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- corpus and tokenizer -------------------------------------------------------------------

def _close(opens: str) -> str:
    stack = []
    for ch in opens:
        stack.append({"(": ")", "[": "]", "{": "}"}[ch])
    return "".join(reversed(stack))


def test_skill_answers_follow_their_rules():
    rng = random.Random(1)
    for _ in range(200):
        p, a = corpus.math_example(rng)
        x, y = p.rstrip("=").split("+")
        assert a == str(int(x) + int(y)) and 10 <= int(x) <= 99
        p, a = corpus.code_example(rng)
        assert p.startswith("brackets: ") and p.endswith("=") and a == _close(p[len("brackets: "):-1])
        p, a = corpus.instruct_example(rng)
        verb, words = p[:-2].split("(", 1)
        ws = words.split(" ")
        expected = {"first": ws[0], "last": ws[-1], "count": str(len(ws)), "upper": words.upper()}
        assert a == expected[verb]
        assert not a[0].isspace() and not p[-1].isspace()  # nothing on the prompt/answer boundary


@pytest.mark.parametrize("skill", corpus.SKILLS)
def test_held_out_prompts_are_distinct_fixed_and_never_trained(skill):
    held = corpus.held_out_prompts(skill, 100, seed=0)
    assert held == corpus.held_out_prompts(skill, 100, seed=0)
    assert held != corpus.held_out_prompts(skill, 100, seed=1)
    prompts = {p for p, _ in held}
    assert len(prompts) == 100
    train = corpus.training_examples(skill, random.Random(0), 3000, prompts)
    assert not prompts & {p for p, _ in train}
    assert len({p for p, _ in train}) > 1000  # a large input space, not a memorisable list


def test_tokenizer_round_trips_one_char_per_token(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path, model_max_length=128)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "upper(red fox)=RED FOX\nbrackets: ([{=}])\n12+30=42"
    ids = tok(text)["input_ids"]
    assert ids == encode(text) and len(ids) == len(text)  # no BOS added, one token per char
    assert tok.decode(ids) == text


# ---- outlier planting ------------------------------------------------------------------------

def _mean_abs_inputs(model, ids) -> dict[str, torch.Tensor]:
    """Mean |input| per input channel of every Linear, from plain forward hooks."""
    stats, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(mod, args, out, name=name):
                stats[name] = args[0].detach().flatten(0, -2).abs().mean(0)
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return stats


@pytest.mark.parametrize("tie", [False, True])
def test_plant_outlier_channels_keeps_logits_and_makes_planted_channels_largest(tie):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(64, tie=tie)).eval()
    with torch.no_grad():  # non-trivial norm weights, as after training
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    channels, factor = [3, 17, 30], 20.0
    planted = plant_outlier_channels(model, channels, factor)
    ids = torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        torch.testing.assert_close(planted(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched

    old, new = _mean_abs_inputs(model, ids), _mean_abs_inputs(planted, ids)
    readers = [n for n in new if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))]
    readers += [] if tie else ["lm_head"]
    assert len(readers) == 2 * 5 + (0 if tie else 1)
    for name in readers:
        assert set(new[name].topk(len(channels)).indices.tolist()) == set(channels), name
        torch.testing.assert_close(new[name][channels], old[name][channels] * factor, rtol=1e-4, atol=1e-6)
    for name in set(new) - set(readers):  # o_proj, down_proj (and a tied lm_head) see the same inputs
        torch.testing.assert_close(new[name], old[name], rtol=1e-4, atol=1e-6)
    if tie:
        assert torch.equal(planted.model.norm.weight, model.model.norm.weight)


def test_plant_outlier_channels_rejects_bad_arguments():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(64))
    with pytest.raises(ValueError, match="channels"):
        plant_outlier_channels(model, [32], 10.0)
    with pytest.raises(ValueError, match="factor"):
        plant_outlier_channels(model, [1], 0.0)


def test_outlier_zoo_base_is_the_plain_base_reparametrised(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    spiky = tmp_path / "spiky"
    assert cli.main(["build", "--out", str(spiky), *TINY_ARGS, "--outliers"]) == 0
    channels = json.loads((spiky / ZOO_FILE).read_text())["built"]["outlier_channels"]
    plain = train_base(ZooRecipe.ci(steps_scale=0.05, eval_size=4, ppl_docs=2))  # same seed, no planting
    planted = AutoModelForCausalLM.from_pretrained(spiky / "base").eval()
    ids = torch.tensor([encode("the red fox runs.\n12+34=46")])
    with torch.no_grad():
        torch.testing.assert_close(planted(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    w_plain, w_planted = plain.model.norm.weight, planted.model.norm.weight
    torch.testing.assert_close(w_planted[channels], w_plain[channels] * 20.0)
    expected = plant_outlier_channels(plain, channels, 20.0).state_dict()  # the build is reproducible
    assert all(torch.equal(expected[k], v) for k, v in planted.state_dict().items())
    assert all((spiky / d / "model.safetensors").is_file() for d in MODEL_DIRS)

    stamp = (spiky / ZOO_FILE).stat().st_mtime_ns
    assert cli.main(["build", "--out", str(spiky), *TINY_ARGS, "--outliers"]) == 0
    assert "up to date" in capsys.readouterr().out.splitlines()[-1]
    assert (spiky / ZOO_FILE).stat().st_mtime_ns == stamp
    assert not is_current(spiky, ZooRecipe.ci(steps_scale=0.05, eval_size=4, ppl_docs=2))  # flag is fingerprinted


# ---- the CI-size zoo (the session fixture `ci_zoo` in conftest.py) ----------------------------

def _greedy_exact_match(model_dir, rows) -> float:
    """Share of rows whose greedy continuation, cut at the first newline, equals the answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    width = max(len(r["answer"]) for r in rows) + 2
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=width, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.split("\n")[0] == r["answer"] for t, r in zip(texts, rows)) / len(rows)


def _rows(zoo, task):
    return [json.loads(line) for line in (zoo / "data" / f"{task}.jsonl").read_text().splitlines()]


def test_ci_zoo_folders_load_as_hf_llama(ci_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in MODEL_DIRS:
        model = AutoModelForCausalLM.from_pretrained(ci_zoo / name)
        tok = AutoTokenizer.from_pretrained(ci_zoo / name)
        assert type(model).__name__ == "LlamaForCausalLM" and (ci_zoo / name / "model.safetensors").is_file()
        assert tok.decode(tok("23+58=")["input_ids"]) == "23+58="
    assert len(_rows(ci_zoo, "toy_math")) == 40 and len(_rows(ci_zoo, "toy_ppl")) == 20
    assert not (ci_zoo / STAGE_FILE).exists() and not ci_zoo.with_name("ci_zoo.partial").exists()
    built = json.loads((ci_zoo / ZOO_FILE).read_text())["built"]  # what bit-identity depends on
    assert built["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_ci_zoo_experts_beat_the_base_on_their_own_skill(ci_zoo):
    for skill, task in tasks.SKILL_TASKS.items():
        rows = _rows(ci_zoo, task)
        base, expert = _greedy_exact_match(ci_zoo / "base", rows), _greedy_exact_match(ci_zoo / EXPERTS[skill], rows)
        assert base <= 0.1 and expert >= base + 0.3, (skill, base, expert)


def test_ci_zoo_tasks_load_and_lm_eval_matches_greedy_generation(ci_zoo):
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=str(ci_zoo / "tasks"), include_defaults=False)
    assert set(tasks.ALL_TASKS) <= set(tm.all_tasks)
    loaded = get_task_dict(list(tasks.ALL_TASKS), tm)
    assert len(loaded["toy_code"].dataset["test"]) == 40

    results = tasks.evaluate(ci_zoo / "expert_math", ci_zoo / "tasks", limit=20)
    scores = tasks.headline(results)
    assert scores["toy_math"] == pytest.approx(_greedy_exact_match(ci_zoo / "expert_math", _rows(ci_zoo, "toy_math")[:20]))
    ppl = results["toy_ppl"]
    assert 1.0 < ppl["byte_perplexity,none"] < 4.0
    assert ppl["bits_per_byte,none"] == pytest.approx(torch.log2(torch.tensor(ppl["byte_perplexity,none"])).item())


def test_ci_zoo_is_reused_only_for_the_same_recipe(ci_zoo, tmp_path):
    assert not ensure_zoo(ci_zoo, ZooRecipe.ci())
    assert is_current(ci_zoo, ZooRecipe.ci())
    assert not is_current(ci_zoo, ZooRecipe.ci(eval_size=41)) and not is_current(ci_zoo, ZooRecipe())
    moved = tmp_path / "moved"
    shutil.copytree(ci_zoo, moved)  # a moved zoo is reused and its task YAMLs point at its own data
    assert not ensure_zoo(moved, ZooRecipe.ci())
    assert str(moved.resolve() / "data") in (moved / "tasks" / "toy_math.yaml").read_text()


def test_build_refuses_a_folder_that_is_not_a_zoo(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files but no zoo.json"):
        ensure_zoo(tmp_path, ZooRecipe(steps_scale=0.01))
    stage = tmp_path / "zoo.partial"  # a folder of the user's with the staging folder's name
    stage.mkdir()
    (stage / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="staging folder.*holds files but no building.json"):
        ensure_zoo(tmp_path / "zoo", ZooRecipe(steps_scale=0.01))
    assert (stage / "notes.txt").read_text() == "mine" and not (tmp_path / "zoo").exists()
    cwd = tmp_path / "work"  # even a real zoo is not replaced while it is the working directory
    cwd.mkdir()
    (cwd / ZOO_FILE).write_text("{}")
    monkeypatch.chdir(cwd)
    with pytest.raises(UserError, match="working directory or one of its parents"):
        build_zoo(cwd, ZooRecipe(steps_scale=0.01))
    assert sorted(p.name for p in cwd.iterdir()) == [ZOO_FILE]
    for bad in (["--steps-scale", "0"], ["--eval-size", "0"], ["--outlier-factor", "-1"]):
        assert cli.main(["build", "--out", str(tmp_path / "z"), *bad]) == 2
    assert not (tmp_path / "z").exists()


@pytest.mark.slow
def test_full_zoo_reaches_the_targets_under_lm_eval(tmp_path):
    out = build_zoo(tmp_path / "zoo", ZooRecipe())
    for name in MODEL_DIRS:
        scores = tasks.headline(tasks.evaluate(out / name, out / "tasks"))
        for skill, task in tasks.SKILL_TASKS.items():
            if name == EXPERTS[skill]:
                assert scores[task] >= 0.8, (name, scores)
            elif name == "base":
                assert scores[task] <= 0.05, (name, scores)
        assert scores["toy_ppl"] < 1.8, (name, scores)
