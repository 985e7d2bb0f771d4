"""End-to-end tests of merge.py on tiny real checkpoints (sharded, .bin, tied, bf16, vocab +1)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge
from merging_methods.primitives import mask_generator, mask_key
from merging_methods.registry import METHODS
from tests.method_cases import case
from tests.tiny_models import build_finetune, build_llama

REPO = Path(__file__).resolve().parents[1]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (safetensors single/sharded or .bin), independent of our reader."""
    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    for f in sorted(folder.glob("pytorch_model*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """Base (fp32, 3 shards) + three fine-tunes: fp32, bf16, legacy .bin with 2 shards."""
    root = tmp_path_factory.mktemp("family")
    base = build_llama(root / "base", seed=0, max_shard_size="40KB")
    fts = [
        build_finetune(base, root / "ft1", seed=1),
        build_finetune(base, root / "ft2", seed=2, dtype=torch.bfloat16),
        build_finetune(base, root / "ft3", seed=3, legacy_bin=True, max_shard_size="x"),
    ]
    return base, fts


def run_merge_cli(*args: str) -> int:
    return merge.main([str(a) for a in args])


def expected_task_arithmetic(base: Path, fts: list[Path], weights: list[float],
                             scaling: float = 1.0) -> dict[str, torch.Tensor]:
    """Dense float64 reference: base + scaling * sum_i w_i (theta_i - base)."""
    b = load_weights(base)
    others = [load_weights(f) for f in fts]
    out = {}
    for name, t0 in b.items():
        acc = torch.zeros_like(t0, dtype=torch.float64)
        for w, o in zip(weights, others):
            acc += w * (o[name].double() - t0.double())
        out[name] = t0.double() + scaling * acc
    return out


def test_task_arithmetic_matches_float64_reference_and_loads(family, tmp_path):
    base, fts = family
    out = tmp_path / "ta"
    assert run_merge_cli("--method", "task_arithmetic", "--base_model", base,
                         "--models_to_merge", ",".join(map(str, fts)),
                         "--weights", "0.5,1,-0.25", "--lambda", "0.8",
                         "--save_path", out, "--max_shard_size", "30KB") == 0
    got = load_weights(out)
    want = expected_task_arithmetic(base, fts, [0.5, 1.0, -0.25], 0.8)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == torch.float32          # the base's dtype
        torch.testing.assert_close(got[name].double(), w, rtol=1e-5, atol=1e-6)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got) and len(set(index["weight_map"].values())) > 1

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    logits = model(**tok(["The capital of France is"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    recipe = (out / "merge_recipe.yaml").read_text()
    assert "task_arithmetic" in recipe and "scaling: 0.8" in recipe and "torch:" in recipe
    assert (out / "README.md").exists() and (out / "generation_config.json").exists()


@pytest.mark.parametrize("method", sorted(m for m in METHODS if not METHODS[m].stacks_layers))
def test_streamed_output_equals_in_memory_merge(family, tmp_path, method):
    """The streamed, sharded result is bit-identical to applying the method's dense function to
    whole state dicts."""
    base, fts = family
    models, flags, keywords = case(method, fts)
    out = tmp_path / method
    assert run_merge_cli("--method", method, "--base_model", base, "--models_to_merge",
                         ",".join(map(str, models)), "--save_path", out, "--seed", "7",
                         "--dtype", "bfloat16", *flags) == 0
    spec = METHODS[method]
    b = load_weights(base)
    others = [load_weights(f) for f in models]
    got = load_weights(out)
    for name, t0 in b.items():   # the dense function (the runner used the fast path if any)
        facts = {"tensor_name": name,
                 "mask_keys": [mask_key(7, i, name) for i in range(len(models))],
                 "generators": [mask_generator(7, i, name) for i in range(len(models))],
                 "is_input_embedding": name == "model.embed_tokens.weight"}
        context = {k: facts[k] for k in spec.context}
        want = spec.fn(t0.float(), [o[name].float() for o in others], **keywords,
                       **context).to(torch.bfloat16)
        assert torch.equal(got[name], want), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_same_seed_same_output_other_seed_differs(family, tmp_path):
    base, fts = family
    args = ["--method", "dare_ties", "--base_model", base, "--models_to_merge",
            ",".join(map(str, fts[:2])), "--density", "0.3"]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run_merge_cli(*args, "--seed", str(seed), "--save_path", tmp_path / name) == 0
    a, b, c = (load_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_base_merged_with_itself_is_the_base(family, tmp_path):
    base, _ = family
    for method in ("ties", "widen", "dare_linear"):
        out = tmp_path / method
        assert run_merge_cli("--method", method, "--base_model", base, "--models_to_merge",
                             f"{base},{base}", "--save_path", out) == 0
        got, want = load_weights(out), load_weights(base)
        assert all(torch.equal(got[k], want[k]) for k in want), method


def test_tied_embeddings_and_vocab_mismatch(tmp_path):
    """Tied base and fine-tunes stay tied; a fine-tune with one extra row is cropped to the base."""
    base = build_llama(tmp_path / "base", seed=0, tie=True)
    ft1 = build_finetune(base, tmp_path / "ft1", seed=1)
    ft2 = build_finetune(base, tmp_path / "ft2", seed=2, extra_rows=1)
    out = tmp_path / "out"
    assert run_merge_cli("--method", "task_arithmetic", "--base_model", base,
                         "--models_to_merge", f"{ft1},{ft2}", "--save_path", out) == 0
    got = load_weights(out)
    assert "lm_head.weight" not in got
    b, o1, o2 = load_weights(base), load_weights(ft1), load_weights(ft2)
    emb = "model.embed_tokens.weight"
    assert o2[emb].shape[0] == b[emb].shape[0] + 1
    want = b[emb].double() + (o1[emb].double() - b[emb]) + (o2[emb][:-1].double() - b[emb])
    torch.testing.assert_close(got[emb].double(), want, rtol=1e-5, atol=1e-6)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_base_with_tied_finetune_uses_its_embedding_as_head(tmp_path):
    base = build_llama(tmp_path / "base", seed=0)
    tied_dir = tmp_path / "tied"
    build_finetune(base, tied_dir, seed=1)
    weights = load_file(tied_dir / "model.safetensors")
    weights.pop("lm_head.weight")
    save_file(weights, tied_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tied_dir / "config.json").read_text())
    (tied_dir / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    out = tmp_path / "out"
    assert run_merge_cli("--method", "task_arithmetic", "--base_model", base,
                         "--models_to_merge", tied_dir, "--save_path", out) == 0
    got = load_weights(out)
    torch.testing.assert_close(got["lm_head.weight"], weights["model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------
# Bad input: exit code 2 and one line naming the problem


def assert_user_error(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    for fragment in fragments:
        assert fragment in err[-1], err[-1]


def test_bad_flags_give_exit_2(family, tmp_path, capsys):
    base, fts = family
    models = ",".join(map(str, fts))
    common = ["--base_model", base, "--save_path", tmp_path / "o"]
    cases = [
        (["--method", "tie", "--models_to_merge", models], ["--method", "ties"]),
        (["--method", "ties", "--models_to_merge", models, "--density", "1.5"], ["--density"]),
        (["--method", "ties", "--models_to_merge", models, "--density", "0"], ["--density"]),
        (["--method", "ties", "--models_to_merge", models, "--weights", "1,2"], ["--weights", "3"]),
        (["--method", "task_arithmetic", "--models_to_merge", models, "--density", "0.5"],
         ["--density", "task_arithmetic"]),
        (["--method", "ties", "--models_to_merge", f"{tmp_path}/missing"],
         ["--models_to_merge", "does not exist"]),
        (["--method", "ties", "--models_to_merge", models, "--device", "cuda"],
         ["--device", "CUDA"]),
    ]
    for args, fragments in cases:
        assert_user_error(capsys, run_merge_cli(*common, *args), *fragments)
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(family, tmp_path, capsys):
    base, fts = family
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["--method", "task_arithmetic", "--base_model", base, "--models_to_merge", fts[0],
            "--save_path", out]
    assert_user_error(capsys, run_merge_cli(*args), "--save_path", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    (out / "merge_recipe.yaml").write_text("an earlier output of this toolkit")
    assert run_merge_cli(*args, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".o.*"))      # no staging folder left behind


def test_shape_mismatch_nan_and_corrupt_inputs(family, tmp_path, capsys):
    base, fts = family
    wider = build_llama(tmp_path / "wider", seed=5, hidden_size=48)
    args = ["--method", "ties", "--base_model", base, "--save_path", tmp_path / "o"]
    assert_user_error(capsys, run_merge_cli(*args, "--models_to_merge", f"{fts[0]},{wider}"),
                      "do not match", "shape")

    nan_dir = tmp_path / "nan"
    build_finetune(base, nan_dir, seed=9)
    weights = load_file(nan_dir / "model.safetensors")
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, nan_dir / "model.safetensors", metadata={"format": "pt"})
    assert_user_error(capsys, run_merge_cli(*args, "--models_to_merge", nan_dir),
                      "model.norm.weight", "NaN")

    bad_dir = tmp_path / "corrupt"
    build_finetune(base, bad_dir, seed=9)
    (bad_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert_user_error(capsys, run_merge_cli(*args, "--models_to_merge", bad_dir),
                      "cannot read", "re-download")
    assert not (tmp_path / "o").exists()


def test_disk_full_is_reported_and_leaves_nothing(family, tmp_path, capsys, monkeypatch):
    import errno

    from checkpoints import checkpoint

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "pwrite", full)
    base, fts = family
    code = run_merge_cli("--method", "task_arithmetic", "--base_model", base,
                         "--models_to_merge", fts[0], "--save_path", tmp_path / "o")
    assert_user_error(capsys, code, "disk full")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_interrupted_merge_leaves_no_output(tmp_path):
    """Kill merge.py mid-run: SIGINT cleans its staging folder, SIGKILL leaves save_path absent."""
    base = build_llama(tmp_path / "base", seed=0, hidden_size=256, intermediate_size=1024,
                       num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)
    fts = [build_finetune(base, tmp_path / f"ft{i}", seed=i) for i in (1, 2)]
    for sig in (signal.SIGINT, signal.SIGKILL):
        for attempt in range(5):  # the small merge can outrun the poll; then try again
            out = tmp_path / f"out_{sig.name}_{attempt}"
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "merge.py"), "--method", "ties", "--density", "0.3",
                 "--base_model", str(base), "--models_to_merge", ",".join(map(str, fts)),
                 "--save_path", str(out), "--max_shard_size", "20KB"],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                # a child inherits an ignored SIGINT (earlier tests' libraries can leave one):
                # restore the default so Python raises KeyboardInterrupt, as in a user's shell
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            deadline = time.time() + 120
            while time.time() < deadline and not list(tmp_path.glob(f".{out.name}.partial-*")):
                time.sleep(0.002)
            proc.send_signal(signal.SIGSTOP)  # frozen mid-run unless it already finished
            if not out.exists():
                break
            proc.send_signal(signal.SIGCONT)
            proc.wait(timeout=60)
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=60)
        assert proc.returncode != 0, "merge finished before it could be interrupted"
        assert not out.exists()
        if sig == signal.SIGINT:
            assert proc.returncode == 130
            assert not list(tmp_path.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("command", [
    ["merge.py", "--method", "task_arithmetic", "--base_model", "{missing}",
     "--models_to_merge", "{missing}", "--save_path", "{out}"],
    ["performAIM.py", "--merged_model", "{missing}", "--pretrained_model_name", "{missing}",
     "--save_path", "{out}"],
    ["performAWR.py", "--merged_model", "{missing}", "--pretrained_model_name", "{missing}",
     "--save_path", "{out}"],
    ["evaluate_model.py", "--model", "{missing}"],
], ids=lambda command: command[0])
def test_entry_scripts_exit_2_with_one_line_on_a_user_error(tmp_path, command):
    """The processes (exit_process ends them) keep main()'s exit code and print one line."""
    fill = {"missing": str(tmp_path / "missing"), "out": str(tmp_path / "out")}
    run = subprocess.run([sys.executable, *(part.format(**fill) for part in command)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ")
    assert str(tmp_path / "missing") in run.stderr and not (tmp_path / "out").exists()


def test_a_merge_process_flushes_its_output_and_exits_0(family, tmp_path):
    """exit_process skips the interpreter's teardown (os._exit): what the merge printed and
    logged still reaches the pipes (block-buffered, as they are by default), and the output
    folder is complete."""
    base, fts = family
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    run = subprocess.run([sys.executable, "merge.py", "--method", "task_arithmetic",
                          "--base_model", str(base), "--models_to_merge", str(fts[0]),
                          "--save_path", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"saved merged model to {out}\n"
    assert f"merged {len(load_weights(base))} tensors" in run.stderr
    assert load_weights(out).keys() == load_weights(base).keys()
