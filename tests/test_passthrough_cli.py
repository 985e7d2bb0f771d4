"""passthrough end to end: layer ranges of tiny checkpoints stacked, renumbered and loaded."""
from __future__ import annotations

import json

import pytest
import torch

import merge
from tests.test_merge_cli import assert_user_error, load_weights
from tests.tiny_models import build_finetune, build_llama


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """4-layer models: an untied fp32 pair and a tied bf16 pair."""
    root = tmp_path_factory.mktemp("deep")
    a = build_llama(root / "a", seed=0, num_hidden_layers=4, max_shard_size="40KB")
    b = build_finetune(a, root / "b", seed=1, scale=0.5)
    ta = build_llama(root / "ta", seed=2, num_hidden_layers=4, tie=True, dtype=torch.bfloat16)
    tb = build_finetune(ta, root / "tb", seed=3, scale=0.5)
    return a, b, ta, tb


def layer(name: str, k: int) -> str:
    return f"model.layers.{k}.{name}"


def stack(*args) -> int:
    return merge.main(["--method", "passthrough", *map(str, args)])


def test_slices_are_stacked_renumbered_and_scaled(deep, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b, _, _ = deep
    out = tmp_path / "out"
    assert stack("--base_model", a, "--models_to_merge", f"{a},{b}", "--layer_ranges", "0:3,1:4",
                 "--scale", "1,0.5", "--save_path", out) == 0
    got, wa, wb = load_weights(out), load_weights(a), load_weights(b)
    sources = [(wa, 0, 1.0), (wa, 1, 1.0), (wa, 2, 1.0), (wb, 1, 0.5), (wb, 2, 0.5), (wb, 3, 0.5)]
    for k, (weights, source, scale) in enumerate(sources):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            want = weights[layer(name, source)] * scale
            assert torch.equal(got[layer(name, k)], want), (k, name)
    assert torch.equal(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], wb["lm_head.weight"] * 0.5)   # the last slice's
    assert not any(".layers.6." in n for n in got)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    assert torch.equal(model.model.layers[4].mlp.up_proj.weight.data,
                       wb[layer("mlp.up_proj.weight", 2)] * 0.5)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()
    recipe = (out / "merge_recipe.yaml").read_text()
    assert "passthrough" in recipe and "layer_ranges" in recipe


def test_tied_donor_gives_a_tied_output(deep, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, ta, tb = deep
    out = tmp_path / "tied"
    assert stack("--base_model", ta, "--models_to_merge", f"{tb},{ta}", "--layer_ranges",
                 "2:4,0:1", "--save_path", out) == 0
    got = load_weights(out)
    wt = {n: t.to(torch.bfloat16) for n, t in load_weights(tb).items()}   # the donor's dtype
    assert "lm_head.weight" not in got
    assert torch.equal(got["model.embed_tokens.weight"], wt["model.embed_tokens.weight"])
    assert torch.equal(got[layer("mlp.up_proj.weight", 1)], wt[layer("mlp.up_proj.weight", 3)])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_untied_donor_takes_a_tied_last_slice_head_from_its_embedding(deep, tmp_path):
    a, _, ta, _ = deep
    out = tmp_path / "mixed"
    assert stack("--base_model", a, "--models_to_merge", f"{a},{ta}", "--layer_ranges",
                 "0:2,2:4", "--save_path", out, "--dtype", "float32") == 0
    got = load_weights(out)
    want = load_weights(ta)["model.embed_tokens.weight"].float()
    assert torch.equal(got["lm_head.weight"], want)


@pytest.mark.parametrize("extra, fragment", [
    ([], "--layer_ranges: passthrough needs one layer range per model"),
    (["--layer_ranges", "0:2"], "--layer_ranges: 1 ranges for 2 models"),
    (["--layer_ranges", "0:2,3-4"], "--layer_ranges: expected comma-separated start:end pairs"),
    (["--layer_ranges", "0:2,2:9"], "layer_range [2, 9] must satisfy 0 <= start < end <= 4"),
    (["--layer_ranges", "0:2,2:4", "--aim"], "--aim: passthrough has no base to relax toward"),
])
def test_bad_slices_are_one_line_errors(deep, tmp_path, capsys, extra, fragment):
    a, b, _, _ = deep
    code = stack("--base_model", a, "--models_to_merge", f"{a},{b}", "--save_path",
                 tmp_path / "o", *extra)
    assert_user_error(capsys, code, fragment)
    assert not (tmp_path / "o").exists()


def test_layer_ranges_belong_to_passthrough(deep, tmp_path, capsys):
    a, b, _, _ = deep
    code = merge.main(["--method", "ties", "--base_model", str(a), "--models_to_merge", str(b),
                       "--layer_ranges", "0:2", "--save_path", str(tmp_path / "o")])
    assert_user_error(capsys, code, "--layer_ranges applies only to --method passthrough")
