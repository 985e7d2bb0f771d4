"""End-to-end tests of performAIM.py / performAWR.py and merge.py --aim on tiny checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import merge
import performAIM
import performAWR
from tests.test_merge_cli import assert_user_error, load_weights
from tests.tiny_models import build_finetune, build_llama

CALIB = ["--calib_samples", "8", "--block_size", "512"]


@pytest.fixture(scope="module")
def merged_family(tmp_path_factory):
    """Base, two fine-tunes, their task-arithmetic merge and a saved stats file (builtin texts)."""
    root = tmp_path_factory.mktemp("aim")
    base = build_llama(root / "base", seed=0)
    fts = [build_finetune(base, root / f"ft{i}", seed=i, scale=0.2) for i in (1, 2)]
    merged = root / "merged"
    assert merge.main(["--method", "task_arithmetic", "--base_model", str(base),
                       "--models_to_merge", f"{fts[0]},{fts[1]}", "--save_path", str(merged)]) == 0
    stats = root / "stats.safetensors"
    out = root / "aim04"
    assert performAIM.main(["--merged_model", str(merged), "--pretrained_model_name", str(base),
                            "--omega", "0.4", "--save_path", str(out), "--calib_data", "builtin",
                            "--stats", str(stats), *CALIB]) == 0
    return dict(root=root, base=base, fts=fts, merged=merged, stats=stats, aim04=out)


def read_stats(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}, json.loads(f.metadata()["axes"])


def test_performaim_matches_dense_reference(merged_family):
    """Every relaxed weight equals W_base + (W_merged - W_base) * (1 - a (1 - omega)) in float64."""
    stats, axes = read_stats(merged_family["stats"])
    base, merged = load_weights(merged_family["base"]), load_weights(merged_family["merged"])
    got = load_weights(merged_family["aim04"])
    assert set(got) == set(merged)
    hooked = set(stats)
    assert "model.layers.0.self_attn.q_proj.weight" in hooked and "lm_head.weight" in hooked
    assert "model.norm.weight" in hooked and "model.embed_tokens.weight" not in hooked
    for name, w_merged in merged.items():
        if name not in hooked:
            assert torch.equal(got[name], w_merged), name        # embeddings etc. untouched
            continue
        s = stats[name].double().abs()
        a = s / s.max()
        r = 1 - a * (1 - 0.4)
        shape = [1] * w_merged.ndim
        shape[axes[name]] = -1
        want = base[name].double() + (w_merged.double() - base[name].double()) * r.view(shape)
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6)
        top = int(torch.argmax(s))
        idx = [slice(None)] * w_merged.ndim
        idx[axes[name]] = top
        delta_top = (got[name] - base[name])[tuple(idx)].double()
        torch.testing.assert_close(delta_top, 0.4 * (w_merged - base[name])[tuple(idx)].double(),
                                   rtol=1e-4, atol=1e-6)


def test_output_loads_generates_and_records(merged_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merged_family["aim04"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = model.generate(**tok(["The capital of"], return_tensors="pt"), max_new_tokens=4,
                         do_sample=False)
    assert ids.shape[1] > 3
    recipe = (out / "merge_recipe.yaml").read_text()
    assert "omega: 0.4" in recipe and "stats_sha256" in recipe and "task_arithmetic" in recipe


def test_omega_one_is_identity_and_several_omegas_equal_separate_runs(merged_family, tmp_path):
    f = merged_family
    args = ["--merged_model", str(f["merged"]), "--pretrained_model_name", str(f["base"]),
            "--calib_data", "builtin", "--stats", str(f["stats"]), *CALIB]
    assert performAIM.main([*args, "--omega", "1.0,0.4,0.0", "--save_path", str(tmp_path / "m")]) == 0
    merged = load_weights(f["merged"])
    one = load_weights(tmp_path / "m_omega1")
    assert all(torch.equal(one[k], merged[k]) for k in merged)
    sep = load_weights(f["aim04"])
    multi = load_weights(tmp_path / "m_omega0.4")
    assert all(torch.equal(sep[k], multi[k]) for k in sep)
    # performAWR is the same command under its earlier name
    assert performAWR.main([*args, "--omega", "0.4", "--save_path", str(tmp_path / "awr")]) == 0
    awr = load_weights(tmp_path / "awr")
    assert all(torch.equal(sep[k], awr[k]) for k in sep)


def test_reused_stats_equal_fresh_stats(merged_family, tmp_path):
    f = merged_family
    fresh = tmp_path / "fresh.safetensors"
    assert performAIM.main(["--merged_model", str(f["merged"]), "--pretrained_model_name",
                            str(f["base"]), "--calib_data", "builtin", "--stats", str(fresh),
                            "--save_path", str(tmp_path / "o"), *CALIB]) == 0
    a, _ = read_stats(fresh)
    b, _ = read_stats(f["stats"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got, want = load_weights(tmp_path / "o"), load_weights(f["aim04"])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_inline_aim_equals_merge_then_performaim(merged_family, tmp_path):
    f = merged_family
    out = tmp_path / "inline"
    assert merge.main(["--method", "task_arithmetic", "--base_model", str(f["base"]),
                       "--models_to_merge", f"{f['fts'][0]},{f['fts'][1]}", "--save_path", str(out),
                       "--aim", "--omega", "0.4", "--calib_data", "builtin",
                       "--stats", str(f["stats"]), *CALIB]) == 0
    got, want = load_weights(out), load_weights(f["aim04"])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert "omega: 0.4" in (out / "merge_recipe.yaml").read_text()


def test_local_file_calibration(merged_family, tmp_path):
    f = merged_family
    corpus = tmp_path / "calib.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"The {w} sat on the mat near the {w}."})
                                for w in ["cat", "dog", "fox", "owl", "bee", "ant"] * 4))
    assert performAIM.main(["--merged_model", str(f["merged"]), "--pretrained_model_name",
                            str(f["base"]), "--calib_data", str(corpus), "--save_path",
                            str(tmp_path / "o"), "--calib_samples", "20", "--block_size", "64"]) == 0
    got, merged = load_weights(tmp_path / "o"), load_weights(f["merged"])
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(got[name], merged[name])


def test_bad_inputs_exit_2(merged_family, tmp_path, capsys):
    f = merged_family
    common = ["--merged_model", str(f["merged"]), "--calib_data", "builtin", *CALIB,
              "--save_path", str(tmp_path / "o")]
    assert_user_error(capsys, performAIM.main([*common, "--pretrained_model_name", str(f["base"]),
                                               "--omega", "1.5"]), "--omega", "[0, 1]")
    other_base = build_llama(tmp_path / "other", seed=11)
    assert_user_error(capsys, performAIM.main([*common, "--pretrained_model_name", str(other_base),
                                               "--stats", str(f["stats"])]), "--stats")
    wider = build_llama(tmp_path / "wider", seed=3, num_hidden_layers=3)
    assert_user_error(capsys, performAIM.main([*common, "--pretrained_model_name", str(wider)]),
                      "different tensors")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(f["base"], no_tok)
    for p in no_tok.glob("tokenizer*"):
        p.unlink()
    assert_user_error(capsys, performAIM.main([*common, "--pretrained_model_name", str(no_tok)]),
                      "tokenizer")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("moved", [False, True])
def test_posthoc_aim_refuses_slices_that_move_layers(merged_family, tmp_path, capsys, moved):
    """A sliced merge whose output layer 0 is the base's layer 1 is recorded as such, and
    performAIM refuses it (it would relax toward the wrong layer) without writing; slices that
    keep every layer in place relax as usual."""
    f = merged_family
    ranges = [[1, 2], [0, 1]] if moved else [[0, 1], [1, 2]]
    config = tmp_path / "sliced.yml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {f['base']}\nparameters: {{weight: 0.5}}\n"
        "slices:\n" + "".join(
            f"  - sources: [{{model: {f['base']}, layer_range: {r}}}, "
            f"{{model: {f['fts'][0]}, layer_range: {r}}}]\n" for r in ranges))
    merged = tmp_path / "merged"
    assert merge.main(["--config", str(config), "--save_path", str(merged)]) == 0
    out = tmp_path / "aim"
    code = performAIM.main(["--merged_model", str(merged), "--pretrained_model_name",
                            str(f["base"]), "--stats", str(f["stats"]), "--calib_data", "builtin",
                            "--save_path", str(out), *CALIB])
    if moved:
        assert_user_error(capsys, code, "layers do not sit where the base's do")
        assert not out.exists()
    else:
        assert code == 0 and out.exists()
