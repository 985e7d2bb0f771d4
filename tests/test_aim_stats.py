"""AIM statistics (ALGORITHMS.md §12.2-12.3): module selection, hook statistics vs an independent
float64 re-computation of every module's input, batching, hook cleanup, and the stats file."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from aim.collect import collect_stats, input_statistics, load_base_for_calibration, relaxable_modules
from aim.stats_io import ActivationStats, StatsKey, base_fingerprint, file_sha256, load_stats, save_stats
from checkpoints.errors import UserError
from tests.tiny_models import build_llama

LAYER_WEIGHTS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("base"), seed=0)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_base_for_calibration(str(llama_dir), "cpu", torch.float32)


@pytest.fixture(scope="module")
def blocks(llama):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, llama.config.vocab_size, (3, 12), generator=g)


def reference_inputs(model, blocks):
    """Σ_blocks mean_tokens |x| for every module input, by re-running Llama by hand in float64."""
    m = copy.deepcopy(model).double()
    cfg, out = m.config, defaultdict(float)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // heads

    def record(name, x):
        out[f"{name}.weight"] = out[f"{name}.weight"] + x.abs().mean(0)

    def rms(norm, x):
        return norm.weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rope(x, cos, sin):  # x [heads, T, dim]
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    for block in blocks:
        steps = block.numel()
        h = m.model.embed_tokens.weight[block]  # [T, H]
        cos, sin = (t[0] for t in m.model.rotary_emb(h[None], torch.arange(steps)[None]))
        causal = torch.ones(steps, steps, dtype=torch.bool).tril()
        for i, layer in enumerate(m.model.layers):
            p, att, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
            record(p + "input_layernorm", h)
            n = rms(layer.input_layernorm, h)
            for proj in "qkv":
                record(p + f"self_attn.{proj}_proj", n)
            q = rope((n @ att.q_proj.weight.T).view(steps, heads, dim).transpose(0, 1), cos, sin)
            k = rope((n @ att.k_proj.weight.T).view(steps, kv_heads, dim).transpose(0, 1), cos, sin)
            v = (n @ att.v_proj.weight.T).view(steps, kv_heads, dim).transpose(0, 1)
            k, v = (t.repeat_interleave(heads // kv_heads, 0) for t in (k, v))
            scores = (q @ k.transpose(1, 2) / math.sqrt(dim)).masked_fill(~causal, float("-inf"))
            a = (scores.softmax(-1) @ v).transpose(0, 1).reshape(steps, heads * dim)
            record(p + "self_attn.o_proj", a)
            h = h + a @ att.o_proj.weight.T
            record(p + "post_attention_layernorm", h)
            n = rms(layer.post_attention_layernorm, h)
            record(p + "mlp.gate_proj", n)
            record(p + "mlp.up_proj", n)
            act = F.silu(n @ mlp.gate_proj.weight.T) * (n @ mlp.up_proj.weight.T)
            record(p + "mlp.down_proj", act)
            h = h + act @ mlp.down_proj.weight.T
        record("model.norm", h)
        h = rms(m.model.norm, h)
        record("lm_head", h)
        logits = h @ m.lm_head.weight.T
    return dict(out), logits


def test_plan_selects_the_section_12_2_weights_by_checkpoint_name(llama, llama_dir):
    plan = relaxable_modules(llama)
    expected = {f"model.layers.{i}.{w}.weight" for i in range(2) for w in LAYER_WEIGHTS}
    expected |= {"model.norm.weight", "lm_head.weight"}
    assert set(plan.targets) == expected and plan.tied == {} and plan.unrelaxed == {}
    assert {t.axis for n, t in plan.targets.items() if "norm" in n} == {0}
    assert {t.axis for n, t in plan.targets.items() if "norm" not in n} == {1}
    with safe_open(str(llama_dir / "model.safetensors"), "pt") as f:
        assert expected < set(f.keys())


def test_hook_statistics_equal_an_independent_forward(llama, blocks):
    reference, logits = reference_inputs(llama, blocks)
    with torch.no_grad():  # the hand-written forward really is this model
        torch.testing.assert_close(logits.float(), llama(blocks[-1:]).logits[0], rtol=1e-4, atol=1e-4)
    result = collect_stats(llama, blocks, progress=False)
    assert set(result.stats) == set(reference) and result.unrelaxed == {}
    for name, expected in reference.items():
        assert result.stats[name].dtype == torch.float32 and result.stats[name].device.type == "cpu"
        torch.testing.assert_close(result.stats[name].double(), expected, rtol=1e-5, atol=1e-6)


def test_batched_blocks_give_the_same_statistics(llama, blocks):
    one = collect_stats(llama, blocks, batch_size=1, progress=False)
    two = collect_stats(llama, blocks, batch_size=2, progress=False)  # batches of 2 and 1
    for name in one.stats:
        torch.testing.assert_close(two.stats[name], one.stats[name], rtol=1e-6, atol=1e-6)
    assert one.axes == two.axes


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_an_exception(llama, blocks, monkeypatch):
    with pytest.raises(RuntimeError, match="inside"):
        with input_statistics(llama, {"x": "model.norm"}):
            assert _hook_count(llama) == 2
            raise RuntimeError("inside")
    assert _hook_count(llama) == 0

    def broken(*args, **kwargs):
        raise RuntimeError("mid-forward")

    monkeypatch.setattr(llama.model.layers[1].mlp, "forward", broken)
    with pytest.raises(RuntimeError, match="mid-forward"):
        collect_stats(llama, blocks, progress=False)
    assert _hook_count(llama) == 0


class Toy(nn.Module):
    """Not a transformers model: an embedding, a used Linear and one that never runs."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, input_ids, use_cache=False):
        return self.used(self.tok(input_ids))


def test_modules_that_never_run_are_reported():
    toy = Toy()
    result = collect_stats(toy, torch.tensor([[1, 2, 3], [4, 5, 6]]), progress=False)
    assert set(result.stats) == {"used.weight"}  # nn.Embedding is excluded by type
    expected = toy.tok.weight[torch.tensor([1, 2, 3])].abs().mean(0) + toy.tok.weight[torch.tensor([4, 5, 6])].abs().mean(0)
    torch.testing.assert_close(result.stats["used.weight"], expected.detach())
    assert result.unrelaxed == {"unused.weight": "did not run in the calibration forward pass"}
    assert "1 did not run" in result.unrelaxed_summary()


def test_tied_lm_head_is_marked_and_relaxed_only_on_request(tmp_path, blocks):
    model = load_base_for_calibration(str(build_llama(tmp_path, tie=True)), "cpu", torch.float32)
    result = collect_stats(model, blocks, progress=False)
    assert result.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    default_stats, default_axes = result.for_relaxation()
    assert "lm_head.weight" not in default_stats and "model.embed_tokens.weight" not in default_stats
    stats, axes = result.for_relaxation(relax_tied_lm_head=True)
    assert axes["model.embed_tokens.weight"] == 1
    assert torch.equal(stats["model.embed_tokens.weight"], result.stats["lm_head.weight"])


def test_conv1d_uses_axis_zero_and_position_embeddings_are_skipped():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()
    result = collect_stats(gpt2, torch.randint(0, 64, (2, 8)), progress=False)
    assert not any("wte" in n or "wpe" in n for n in result.stats)
    assert result.axes["transformer.h.0.attn.c_attn.weight"] == 0  # Conv1D weight is [in, out]
    assert result.axes["transformer.h.0.mlp.c_proj.weight"] == 0
    assert result.stats["transformer.h.0.mlp.c_proj.weight"].numel() == 64
    assert result.tied == {"lm_head.weight": "transformer.wte.weight"}


def test_fused_moe_experts_are_reported_and_router_keeps_its_checkpoint_name(tmp_path):
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                        num_experts_per_tok=1, bos_token_id=0, eos_token_id=0)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    result = collect_stats(model, torch.randint(0, 64, (3, 8)), batch_size=2, progress=False)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    assert set(result.stats) < on_disk
    assert result.axes["model.layers.0.block_sparse_moe.gate.weight"] == 1  # router [experts, hidden]
    assert set(result.unrelaxed) == {"model.layers.0.mlp.experts.gate_up_proj",
                                     "model.layers.0.mlp.experts.down_proj"}


def test_load_base_for_calibration(llama_dir, tmp_path):
    model = load_base_for_calibration(str(llama_dir), "cpu", torch.bfloat16)
    assert not model.training and model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(UserError, match="--pretrained_model_name"):
        load_base_for_calibration(str(tmp_path / "nowhere"), "cpu", torch.float32)


def _key(llama_dir, **changes):
    fields = dict(base_fingerprint=base_fingerprint(llama_dir), calib_data="builtin", calib_samples=256,
                  block_size=512, calib_seed=42, dtype="float32")
    return StatsKey(**{**fields, **changes})


def test_stats_file_round_trip_and_reuse_check(llama, llama_dir, blocks, tmp_path):
    result = collect_stats(llama, blocks, progress=False)
    result.unrelaxed["x.experts.down_proj"] = "fused"
    path = tmp_path / "stats" / "base.safetensors"
    key = _key(llama_dir)
    save_stats(path, result, key, base_model=str(llama_dir), blocks=blocks, toolkit_version="0.1")
    loaded, meta = load_stats(path, key)
    assert set(loaded.stats) == set(result.stats)
    assert all(torch.equal(loaded.stats[n], result.stats[n]) for n in result.stats)
    assert (loaded.axes, loaded.tied, loaded.unrelaxed) == (result.axes, result.tied, result.unrelaxed)
    assert meta["n_blocks"] == "3" and meta["calib_samples"] == "256" and meta["format"] == "pt"
    assert meta["blocks_sha256"] == hashlib.sha256(b"(3, 12)" + blocks.numpy().tobytes()).hexdigest()
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()

    with pytest.raises(UserError) as err:
        load_stats(path, _key(llama_dir, calib_samples=128, calib_seed=0))
    message = str(err.value)
    assert message.startswith(f"--stats {path}") and "calib_samples '256' in the file vs '128'" in message
    assert "calib_seed" in message and "block_size" not in message


def test_fingerprint_tells_models_apart_but_not_copies(llama_dir, tmp_path):
    other = build_llama(tmp_path / "other", seed=1)
    copied = shutil.copytree(llama_dir, tmp_path / "copy")
    config = json.loads((copied / "config.json").read_text())
    config["transformers_version"] = "0.0.0"
    (copied / "config.json").write_text(json.dumps(config, indent=4))
    assert base_fingerprint(copied) == base_fingerprint(llama_dir)
    assert base_fingerprint(other) != base_fingerprint(llama_dir)
    with pytest.raises(UserError, match="no config.json"):
        base_fingerprint(tmp_path)


def test_foreign_or_broken_stats_files_are_user_errors(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="not an AIM statistics file"):
        load_stats(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="--stats"):
        load_stats(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="--stats"):
        load_stats(tmp_path / "missing.safetensors")


def test_stats_from_another_base_model_are_refused(llama, llama_dir, blocks, tmp_path):
    other = build_llama(tmp_path / "other", seed=1)
    path = tmp_path / "s.safetensors"
    save_stats(path, ActivationStats(stats={"a.weight": torch.ones(3)}, axes={"a.weight": 1}),
               _key(llama_dir), base_model=str(llama_dir), blocks=blocks, toolkit_version="0.1")
    with pytest.raises(UserError, match="base_fingerprint"):
        load_stats(path, _key(other))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_map_gives_the_cpu_statistics(llama, llama_dir, blocks):
    gpu = load_base_for_calibration(str(llama_dir), "cuda", torch.float32)
    assert gpu.lm_head.weight.device.type == "cuda"
    on_gpu = collect_stats(gpu, blocks, batch_size=2, progress=False)
    on_cpu = collect_stats(llama, blocks, progress=False)
    for name, stat in on_cpu.stats.items():
        assert on_gpu.stats[name].device.type == "cpu"
        torch.testing.assert_close(on_gpu.stats[name], stat, rtol=1e-4, atol=1e-5)
