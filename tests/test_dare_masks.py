"""DARE's counter-based keep-masks (mask rule 2, merging_methods/primitives.py): exact bits
against Python integers, distribution, independence, and chunk/order/device invariance."""
from __future__ import annotations

import hashlib
import math
import random

import pytest
import torch

from checkpoints.errors import UserError
from merging_methods.primitives import (
    MASK_RULE, _splitmix64_numpy_, _splitmix64_torch_, keep_bits, keep_mask, keep_threshold,
    mask_key, splitmix64_, used_density,
)
from merging_methods.recipe import MergeRecipe

WORD = (1 << 64) - 1
N = 1 << 20


def mix(z: int) -> int:
    """SplitMix64's finaliser in arbitrary-precision Python integers, masked to 64 bits."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & WORD
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & WORD
    return z ^ (z >> 31)


def signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def draw(key: int, j: int) -> int:
    """The 16-bit draw of flat element j: lane j % 4 of SplitMix64 output j // 4."""
    word = mix((key + (j // 4 + 1) * 0x9E3779B97F4A7C15) & WORD)
    return (word >> (16 * (j % 4))) & 0xFFFF


def test_mixer_matches_python_integers():
    """SplitMix64's published first output for seed 1234567, and two states whose words are
    negative as int64 (the logical shifts must not smear the sign bit)."""
    states = [(1234567 + 0x9E3779B97F4A7C15) & WORD, 0xFFFFFFFFFFFFFFFF, 0x8000000000000001]
    got = splitmix64_(torch.tensor([signed(s) for s in states]), torch.empty(3, dtype=torch.int64))
    assert mix(states[0]) == 6457827717110365317
    assert [v & WORD for v in got.tolist()] == [mix(s) for s in states]


def test_numpy_mixer_gives_the_torch_ops_bits():
    """The CPU mix (numpy uint64 views) and the device mix (torch int64 ops) agree bit for bit,
    so a CPU merge and a CUDA merge draw the same masks."""
    words = torch.randint(-(1 << 63), (1 << 63) - 1, (4099,), dtype=torch.int64,
                          generator=torch.Generator().manual_seed(0))
    scratch = torch.empty_like(words)
    via_numpy = _splitmix64_numpy_(words.clone(), scratch)
    via_torch = _splitmix64_torch_(words.clone(), scratch)
    assert torch.equal(via_numpy, via_torch)
    assert [v & WORD for v in via_numpy[:50].tolist()] == [mix(v & WORD) for v in words[:50].tolist()]


def test_keep_mask_matches_python_integers():
    key = mask_key(3, 1, "model.layers.0.mlp.up_proj.weight")
    t = keep_threshold(0.37)
    start, n = 4097, 37  # not word-aligned at either end
    want = [float(draw(key, j) < t) for j in range(start, start + n)]
    assert keep_mask(key, 0.37, start, n).tolist() == want


def test_the_accelerator_form_of_keep_mask_gives_the_cpu_bits():
    """The torch-only form (flipped signed lanes, run here on the CPU) and the numpy form agree
    over several blocks, unaligned ends and the densities at the edges of the 16-bit steps."""
    from merging_methods.primitives import _keep_mask_on
    key, start, n = mask_key(5, 2, "w"), 3, (1 << 19) + 5
    for density in (1 / 65536, 0.25, 0.5 + 1 / 131072, 65535 / 65536, 1.0):
        torch_form = _keep_mask_on(torch.device("cpu"), key, density, start, n)
        assert torch.equal(torch_form, keep_mask(key, density, start, n)), density
        assert (torch_form.bool().numpy() == keep_bits(key, density, start, n)).all()


def test_mask_key_is_sha256_of_seed_model_and_name():
    digest = hashlib.sha256(b"7:2:lm_head.weight").digest()
    assert mask_key(7, 2, "lm_head.weight") == int.from_bytes(digest[:8], "big")


@pytest.mark.parametrize("density, t", [(0.3, 19661), (0.5, 32768), (1 / 65536, 1),
                                        (1 - 1e-6, 65536), (1.0, 65536)])
def test_density_is_quantised_to_steps_of_1_over_65536(density, t):
    assert keep_threshold(density) == t and used_density(density) == t / 65536


def test_a_density_that_rounds_to_zero_names_the_flag():
    with pytest.raises(UserError, match="^--density: density 1e-06 rounds to 0"):
        keep_threshold(1e-6)


def test_quantised_density_one_keeps_everything():
    assert bool(keep_mask(mask_key(0, 0, "a"), 1 - 1e-6, 5, 1000).eq(1).all())


@pytest.mark.parametrize("density", [0.01, 0.1, 0.3, 0.5, 0.9, 0.999])
def test_keep_fraction_is_within_binomial_bounds(density):
    p = used_density(density)
    kept = float(keep_mask(mask_key(0, 0, f"t{density}"), density, 0, N).sum())
    assert abs(kept - N * p) <= 5 * math.sqrt(N * p * (1 - p))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("other", [(0, 1, "w"), (0, 0, "v"), (1, 0, "w")],
                         ids=["model", "tensor", "seed"])
def test_masks_are_uncorrelated_across_models_tensors_and_seeds(other):
    """|corr| below 5 standard errors (1/sqrt(n)) for independent Bernoulli(1/2) masks."""
    a = keep_mask(mask_key(0, 0, "w"), 0.5, 0, N)
    b = keep_mask(mask_key(*other), 0.5, 0, N)
    assert abs(correlation(a, b)) < 5 / math.sqrt(N)


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5])
def test_neighbouring_entries_are_uncorrelated(lag):
    """Lanes of one word (lag < 4) and neighbouring words give independent draws."""
    mask = keep_mask(mask_key(0, 0, "w"), 0.3, 0, N)
    assert abs(correlation(mask[:-lag], mask[lag:])) < 5 / math.sqrt(N)


@pytest.mark.parametrize("seed", range(4))
def test_chunks_in_any_size_and_order_equal_the_whole_mask(seed):
    rng = random.Random(seed)
    n, key = 10_007, mask_key(seed, 0, "w")
    whole = keep_mask(key, 0.4, 0, n)
    cuts = sorted({0, n, *(rng.randrange(1, n) for _ in range(rng.randrange(1, 40)))})
    chunks = list(zip(cuts, cuts[1:]))
    rng.shuffle(chunks)
    pieced = torch.full((n,), -1.0)
    for start, stop in chunks:
        pieced[start:stop] = keep_mask(key, 0.4, start, stop - start)
    assert torch.equal(pieced, whole)


def test_an_empty_range_gives_an_empty_mask():
    assert keep_mask(mask_key(0, 0, "w"), 0.5, 7, 0).shape == (0,)


def test_same_seed_same_bits_new_seed_new_bits():
    first = keep_mask(mask_key(1, 0, "w"), 0.5, 0, 4096)
    assert torch.equal(first, keep_mask(mask_key(1, 0, "w"), 0.5, 0, 4096))
    assert not torch.equal(first, keep_mask(mask_key(2, 0, "w"), 0.5, 0, 4096))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("start, n", [(0, 1 << 22), (12_345, 99_999)])
def test_cuda_masks_equal_cpu_masks_bit_for_bit(start, n):
    key = mask_key(5, 2, "model.embed_tokens.weight")
    cpu = keep_mask(key, 0.3, start, n)
    gpu = keep_mask(key, 0.3, start, n, "cuda")
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


# ----------------------------------------------------------------------------- recipes
RECIPE = {"method": "dare_ties", "base_model": "b", "models": ["m1", "m2"], "save_path": "o",
          "params": {"density": 0.5}}


def test_recipes_record_the_mask_rule():
    assert MergeRecipe(**RECIPE).as_record()["mask_rule"] == MASK_RULE == 2
    assert MergeRecipe.from_record({**RECIPE, "mask_rule": 2}).mask_rule == 2


@pytest.mark.parametrize("record", [RECIPE, {**RECIPE, "mask_rule": 1}], ids=["none", "1"])
def test_a_dare_record_of_mask_rule_1_is_refused_in_one_line(record):
    with pytest.raises(UserError, match=r"^mask_rule 1: .*set mask_rule: 2") as error:
        MergeRecipe.from_record(record)
    assert "\n" not in str(error.value)


def test_records_of_methods_without_masks_need_no_mask_rule():
    record = {**RECIPE, "method": "task_arithmetic", "params": {}}
    assert MergeRecipe.from_record(record).method == "task_arithmetic"


def test_a_remembered_drop_is_drawn_once_and_gives_the_same_masks(monkeypatch, numpy_masks):
    """RandomDrop(remember=n): the masks drawn over blocks in flat order come back for any
    later range (starts off a byte boundary, ranges crossing blocks) without a second draw,
    equal to keep_mask's; a range past what was drawn is drawn again."""
    from merging_methods import primitives
    n, key, density = 1000, mask_key(0, 1, "w"), 0.4
    drop = primitives.RandomDrop(density, key, remember=n)
    for start in range(0, 992, 64):   # blocks of 64 in flat order, the last 8 entries not
        drop.apply_(torch.ones(min(64, 992 - start)), start)
    want = keep_mask(key, density, 0, n)
    calls = []
    real = primitives.keep_bits
    monkeypatch.setattr(primitives, "keep_bits", lambda *a, **k: calls.append(a) or real(*a, **k))
    for start, stop in [(0, 992), (3, 70), (61, 67), (130, 131), (500, 992)]:
        delta = torch.arange(1.0, stop - start + 1)
        assert torch.equal(drop.apply_(delta, start), torch.arange(1.0, stop - start + 1)
                           * want[start:stop])
    assert calls == []
    assert torch.equal(drop.apply_(torch.ones(12), 988), want[988:])   # past the drawn range
    assert len(calls) == 1
