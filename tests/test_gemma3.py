"""A second architecture: Gemma 3 (tiny, built locally), what the real Gemma-3-270M showed.

Gemma's RMSNorms scale by (1 + weight), so a stored norm weight of 0 is scale 1. AIM pulls a
merged weight toward the *base*, W_base + (W_merged - W_base) * r, which is affine: relaxing the
stored w or the effective scale 1 + w gives the same model. So Gemma's norms are relaxed as
stored, like Llama's (bench/gemma3_realllm.py runs the real model).
"""
from __future__ import annotations

import pytest
import torch

import merge
import performAIM
from tests.test_aim_cli import read_stats
from tests.test_merge_cli import load_weights
from tests.tiny_models import build_finetune, build_gemma3

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
         "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    base = build_gemma3(root / "base")
    fts = [build_finetune(base, root / f"ft{i}", seed=i, scale=0.3) for i in (1, 2)]
    merged = root / "merged"
    assert merge.main(["--method", "ties", "--density", "0.5", "--base_model", str(base),
                       "--models_to_merge", f"{fts[0]},{fts[1]}", "--save_path", str(merged)]) == 0
    stats, out = root / "stats.safetensors", root / "aim"
    assert performAIM.main(["--merged_model", str(merged), "--pretrained_model_name", str(base),
                            "--save_path", str(out), "--omega", "0.4", "--calib_data", "builtin",
                            "--calib_samples", "8", "--block_size", "64", "--batch_size", "2",
                            "--stats", str(stats)]) == 0
    return dict(base=base, merged=merged, stats=stats, aim=out)


def test_hooked_modules_are_every_linear_and_norm_but_not_embeddings(gemma):
    stats, axes = read_stats(gemma["stats"])
    want = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in NORMS + LINEARS}
    want |= {"model.norm.weight", "lm_head.weight"}
    assert set(stats) == want
    assert all(axes[n] == 0 for n in stats if n.endswith("norm.weight"))
    assert stats["model.layers.0.self_attn.q_norm.weight"].shape == (16,)   # head_dim channels


def test_norms_are_relaxed_toward_the_base_in_stored_and_effective_form(gemma):
    stats, _ = read_stats(gemma["stats"])
    base, merged = load_weights(gemma["base"]), load_weights(gemma["merged"])
    got = load_weights(gemma["aim"])
    assert "lm_head.weight" not in got                              # tied: follows the embedding
    assert torch.equal(got["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    for name in (n for n in stats if n.endswith("norm.weight")):
        s = stats[name].double().abs()
        r = 1 - s / s.max() * (1 - 0.4)
        b, m = base[name].double(), merged[name].double()
        torch.testing.assert_close(got[name].double(), b + (m - b) * r, rtol=1e-5, atol=1e-6)
        effective = (1 + b) + ((1 + m) - (1 + b)) * r                 # the scale Gemma applies
        torch.testing.assert_close(1 + got[name].double(), effective, rtol=1e-5, atol=1e-6)
        assert not torch.equal(got[name], merged[name]), name


def test_batched_calibration_equals_one_block_at_a_time(gemma, tmp_path):
    """q_norm/k_norm see [blocks, seq, heads, head_dim]: per-block means still line up."""
    single = tmp_path / "single.safetensors"
    assert performAIM.main(["--merged_model", str(gemma["merged"]), "--pretrained_model_name",
                            str(gemma["base"]), "--save_path", str(tmp_path / "o"),
                            "--calib_data", "builtin", "--calib_samples", "8", "--block_size",
                            "64", "--batch_size", "1", "--stats", str(single)]) == 0
    batched, _ = read_stats(gemma["stats"])
    one, _ = read_stats(single)
    for name in one:
        torch.testing.assert_close(batched[name], one[name], rtol=1e-5, atol=1e-6)


def test_relaxed_gemma_loads_and_gives_finite_logits(gemma):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma["aim"])
    assert type(model).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()
