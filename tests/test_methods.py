"""Per-tensor merge math against the float64 paper-box references (merging_methods/reference.py).

Every method is checked through its dense function and, where it has one, its fast path; the
references re-implement the formulas densely in float64 (stacked deltas, stable sorts, literal
cosines) and share no code with either. Inputs sit on a dyadic grid, so float32 deltas are
exact and the top-k order (with its many ties) is the same in all three.
"""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from checkpoints.errors import UserError
from merging_methods import primitives, reference
from merging_methods.primitives import keep_topk, mask_generator, mask_key
from merging_methods.registry import METHODS, get_method, method_warnings
from merging_methods.widen import Units, direction_change, rank_scores, widen, widen_held

SEED, NAME = 7, "model.layers.0.mlp.up_proj.weight"
FAST = sorted(m for m in METHODS if METHODS[m].fast)
# the methods with a reference.py paper box; the later ones (§6-§11, §17) are checked against
# references written in tests/test_new_methods.py, the spherical ones (§19.4-19.6, two models
# or zero task vectors) against reference.py in tests/test_spherical_methods.py (their fast
# paths here only against their dense functions, bit for bit)
SPHERICAL = ("nuslerp", "multislerp", "karcher")
REFERENCED = sorted(m for m in METHODS if hasattr(reference, m) and m not in SPHERICAL)
PATHS = [(m, "dense") for m in REFERENCED] + [(m, "fast") for m in FAST if m in REFERENCED]


def ref_generator(seed: int, index: int, name: str) -> torch.Generator:
    """DELLA's mask generator (§17.3), written independently of mask_generator."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{index}:{name}".encode()).digest()[:8], "big")
    return torch.Generator().manual_seed(value & (2**63 - 1))


def context(method, n_models, is_input_embedding=False):
    """The per-tensor keyword arguments the method declares (tensor NAME, seed SEED)."""
    facts = {"tensor_name": NAME, "layer_index": 0, "num_layers": 2,
             "is_input_embedding": is_input_embedding,
             "generators": [mask_generator(SEED, i, NAME) for i in range(n_models)],
             "mask_keys": [mask_key(SEED, i, NAME) for i in range(n_models)]}
    return {k: facts[k] for k in METHODS[method].context}


def resolved(method, n_models, **overrides):
    """The method's parameters resolved; one naming a model is given as the model's index (the
    runner maps a name to it) and kept as is."""
    spec, given = METHODS[method], {**REQUIRED.get(method, {}), **overrides}
    named = {k: v for k, v in given.items() if spec.params[k].names_model}
    return {**spec.resolve({**given, **{k: str(v) for k, v in named.items()}}, n_models), **named}


def fit(method, others):
    """As many of `others` as the method takes (nearswap, arcee_fusion: one)."""
    return others[:METHODS[method].others[1] or len(others)]


def run(method, base, others, path="dense", **overrides):
    """(result, resolved params) of the method's dense function or fast path."""
    spec = METHODS[method]
    others = fit(method, others)
    params = resolved(method, len(others), **overrides)
    fn = spec.fn if path == "dense" else spec.fast.fn
    return fn(base, others, **params, **context(method, len(others))), params


def expected(method, base, others, params, **ctx):
    """The float64 reference result (DARE: its own masks, from SEED and NAME)."""
    others = fit(method, others)
    given = context(method, len(others), **ctx)
    if given.pop("mask_keys", None) is not None:
        given.update(seed=SEED, tensor_name=NAME)
    return getattr(reference, method)(base, others, **params, **given)


def grid(shape, scale, gen, levels=64):
    """Random values on a dyadic grid (exact in float32), with many repeats."""
    return torch.randint(-levels, levels + 1, shape, generator=gen).float() * scale


def family(shape=(12, 10), n=3, seed=0, levels=8):
    gen = torch.Generator().manual_seed(seed)
    base = grid(shape, 1 / 64, gen, 256)
    return base, [base + grid(shape, 1 / 1024, gen, levels) for _ in range(n)]


OVERRIDES = {  # non-default settings that exercise each method's paths
    "linear": {"weights": [0.5, 1.5, 1.0]},
    "task_arithmetic": {"weights": [1.0, 0.5, -0.75], "scaling": 0.8},
    "ties": {"weights": [1.0, 0.5, 0.75], "density": [0.3, 0.5, 1.0], "scaling": 0.9},
    "dare_linear": {"weights": [1.0, 0.5, -0.75], "density": [0.3, 0.5, 1.0]},
    "dare_ties": {"weights": [1.0, 0.5, 0.75], "density": [0.3, 0.5, 1.0]},
    "widen": {"above_average_value_ratio": 0.8, "score_calibration_value": 0.6},
    "breadcrumbs": {"weights": [1.0, 0.5, -0.75], "density": [0.3, 0.5, 0.9],
                    "gamma": [0.1, 0.05, 0.0]},
    "breadcrumbs_ties": {"weights": [1.0, 0.5, 0.75], "density": [0.3, 0.5, 0.9],
                         "gamma": [0.1, 0.05, 0.2]},
    "della": {"weights": [1.0, 0.5, 0.75], "density": [0.3, 0.5, 1.0],
              "epsilon": [0.1, 0.2, 0.05]},
    "della_linear": {"weights": [1.0, 0.5, -0.75], "density": [0.3, 0.5, 0.6],
                     "epsilon": [0.1, 0.2, 0.05]},
    "sce": {},  # select_topk < 1: tests/test_sce_fusion_ram.py (variance ties round differently)
    "nearswap": {"t": 3 / 1024},
    "slerp": {"t": 0.3},
    "arcee_fusion": {},
    "ram": {"ram_epsilon": 2 / 1024},
    "ramplus_tl": {"ram_epsilon": 2 / 1024, "ramplus_r": 0.5, "ramplus_alpha": 1.5},
    "model_stock": {"filter_wise": True},
    "nuslerp": {"weights": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": True},
    "multislerp": {"weights": [0.5, 1.0, 0.7], "normalize_weights": False},
    "karcher": {"max_iter": 5},
    "fr_merging": {"weights": [1.0, 0.5, -0.75], "fr_ratio": 0.5, "fr_faithful": True},
    "free_merging": {"weights": [1.0, 0.5, 0.75], "task_model": 2, "expert_density": 0.1,
                     "fr_ratio": 0.5},
}
REQUIRED = {"nearswap": {"t": 1 / 1024}, "free_merging": {"task_model": 0}}  # no default


@pytest.fixture(params=[primitives.CPU_BLOCK, 7], ids=["block=default", "block=7"])
def block(request, monkeypatch):
    """Run each test with the real block size and with tiny blocks (many block boundaries)."""
    monkeypatch.setattr(primitives, "CPU_BLOCK", request.param)
    return request.param


# ----------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method, path", PATHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference(method, path, seed, block):
    base, others = family(seed=seed)
    out, params = run(method, base, others, path, **OVERRIDES[method])
    assert out.dtype == torch.float32 and out.shape == base.shape
    torch.testing.assert_close(out.double(), expected(method, base, others, params),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, path", PATHS)
def test_defaults_match_reference_with_ties_and_zero_sums(method, path, block):
    """Hand-crafted: coarse deltas tie in |delta|, and +x/-x pairs give zero sign sums."""
    base, others = family(shape=(9, 8), levels=2)
    others[1][0] = 2 * base[0] - others[0][0]  # delta_1 = -delta_0 on the first row
    extra = {"density": [0.4, 0.6, 0.25]} if "density" in METHODS[method].params else {}
    out, params = run(method, base, others, path, **extra)
    torch.testing.assert_close(out.double(), expected(method, base, others, params),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, path", PATHS)
def test_base_merged_with_copies_of_itself_is_the_base(method, path, block):
    base, _ = family()
    out, _ = run(method, base, [base.clone() for _ in range(3)], path, **OVERRIDES[method])
    assert torch.equal(out, base)


@pytest.mark.parametrize("method, path", PATHS)
@pytest.mark.parametrize("case", ["density 1", "tiny density", "zero deltas", "all zero"])
def test_results_stay_finite(method, path, case):
    base, others = family()
    density = {"tiny density": 1 / base.numel()}.get(case, 1.0)
    if case == "zero deltas":
        others = [base.clone() for _ in others]
    if case == "all zero":
        base, others = torch.zeros_like(base), [torch.zeros_like(base) for _ in others]
    extra = {"density": density} if "density" in METHODS[method].params else {}
    out, _ = run(method, base, others, path, **extra)
    assert torch.isfinite(out).all()


FAST_SETTINGS = [  # per fast method: its defaults, OVERRIDES, and each rescale variant
    (m, name, settings) for m in FAST for name, settings in [
        ("defaults", {"density": [0.4, 0.6, 0.25]} if "density" in METHODS[m].params else {}),
        ("overrides", OVERRIDES[m]),
        *([("l1", {**OVERRIDES[m], "rescale_mode": "l1"}),
           ("no rescale", {**OVERRIDES[m], "rescale": False})] if "rescale_mode" in METHODS[m].params
          else [("l1", {**OVERRIDES[m], "rescale": True})] if "rescale" in METHODS[m].params else []),
        *([("normalize", {**OVERRIDES[m], "normalize": True, "weights": [1.0, 0.5, 0.75]})]
          if "normalize" in METHODS[m].params else []),
    ]]


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("method, name, settings", FAST_SETTINGS,
                         ids=[f"{m}-{n}" for m, n, _ in FAST_SETTINGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_equals_the_dense_function_bit_for_bit(method, name, settings, dtype, block):
    """The runner may use a method's fast path only because it returns the dense function's
    bits: same float32 ops in the same order, on float32 inputs and on bf16 inputs (which the
    fast path reads as stored, the dense function as float32 copies)."""
    gen = torch.Generator().manual_seed(3)
    base = (torch.randn(37, 29, generator=gen) * 0.02).to(dtype)
    others = [(base.float() + torch.randn(37, 29, generator=gen) * 1e-3).to(dtype)
              for _ in range(3)]
    others[1][0] = (2 * base[0].float() - others[0][0].float()).to(dtype)  # zero sign sums
    spec = METHODS[method]
    stored = spec.fast.stored_dtype_inputs
    fast_in = (base, others) if stored else (base.float(), [o.float() for o in others])
    dense, params = run(method, base.float(), [o.float() for o in others], **settings)
    fast, _ = run(method, *fast_in, "fast", **settings)
    assert torch.equal(bits(fast), bits(dense))


@pytest.mark.parametrize("method", FAST)
def test_fast_path_writes_into_out(method):
    base, others = family()
    others = fit(method, others)
    fresh, params = run(method, base, others, **OVERRIDES[method])
    buffer = torch.full_like(base, float("nan"))
    fast = METHODS[method].fast.fn
    result = fast(base, others, **params, **context(method, len(others)), out=buffer)
    assert torch.equal(buffer, fresh) and result.data_ptr() == buffer.data_ptr()
    with pytest.raises(ValueError, match="out"):
        fast(base, others, **params, **context(method, len(others)), out=torch.empty(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method, path", PATHS)
def test_cuda_matches_cpu(method, path):
    base, others = family(shape=(300, 70))
    cpu, params = run(method, base, others, path, **OVERRIDES[method])
    gpu, _ = run(method, base.cuda(), [o.cuda() for o in others], path, **OVERRIDES[method])
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)


# ----------------------------------------------------------------------------- task arithmetic
def test_task_arithmetic_of_one_model_returns_that_model():
    base, others = family(n=1)
    out, _ = run("task_arithmetic", base, others)
    assert torch.equal(out, others[0])


def test_negation_subtracts_a_task_vector():
    base, (a, b) = family(n=2)
    out, _ = run("task_arithmetic", base, [a, b], weights=[1.0, -0.5])
    expected = base.double() + (a.double() - base) - 0.5 * (b.double() - base)
    torch.testing.assert_close(out.double(), expected)


def test_normalized_weights_summing_to_zero_fall_back_to_divisor_one():
    base, (a, b) = family(n=2)
    out, _ = run("task_arithmetic", base, [a, b], weights=[1.0, -1.0], normalize=True)
    torch.testing.assert_close(out.double(), base.double() + (a.double() - b.double()))


# ----------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("size", [3, 16, 1 << 18])
@pytest.mark.parametrize("levels", [2, 50, 10**6])
def test_keep_topk_keeps_exactly_k_with_lower_index_first(size, levels):
    gen = torch.Generator().manual_seed(levels)
    x = torch.randint(-levels, levels + 1, (97,), generator=gen).float()
    for density in (0.011, 0.1, 0.37, 0.5, 0.9, 0.999):
        mask = keep_topk(x, density, size=size)
        assert int(mask.sum()) == math.floor(density * x.numel())
        assert torch.equal(mask, reference.keep_topk(x.double(), density))


def test_keep_topk_tie_break_by_hand():
    x = torch.tensor([1.0, -3.0, 2.0, 3.0, -2.0, 2.0, 0.0, 2.0])
    # k = floor(0.5 * 8) = 4: both 3s, then the first two 2s (indices 2 and 4)
    assert keep_topk(x, 0.5).tolist() == [False, True, True, True, True, False, False, False]


@pytest.mark.parametrize("sample", [primitives.SAMPLE, 5])
def test_keep_topk_on_bf16_like_data_matches_a_stable_sort(sample, monkeypatch):
    """Large runs of equal |delta| (as bf16 checkpoints give) use the counting path."""
    monkeypatch.setattr(primitives, "SAMPLE", sample)
    gen = torch.Generator().manual_seed(3)
    base = (torch.randn(60_000, generator=gen) * 0.02).bfloat16().float()
    other = (base + torch.randn(60_000, generator=gen) * 0.001).bfloat16().float()
    delta = other - base
    for density in (0.2, 0.5):
        assert torch.equal(keep_topk(delta, density, size=4096), reference.keep_topk(delta.double(), density))


@pytest.mark.parametrize("path", ["dense", "fast"])
@pytest.mark.parametrize("density", [0.2, 0.5])
@pytest.mark.parametrize("change", ["ulps", "noise"])
def test_ties_on_bf16_tensors_spanning_several_blocks(density, change, path):
    """Real block size on bf16 data: fine-tunes a few ulps away give long runs of tied |delta|
    (the one counting pass), noisy ones need the radix select; the tie cut is found on the way."""
    gen = torch.Generator().manual_seed(11)
    base = (torch.randn(700, 1000, generator=gen) * 0.02).bfloat16().float()

    def fine_tune():
        if change == "ulps":
            return base * (1 + torch.randint(-2, 3, base.shape, generator=gen) / 128)
        return base + torch.randn(base.shape, generator=gen) * 0.001

    others = [fine_tune().bfloat16().float() for _ in range(2)]
    out, params = run("ties", base, others, path, density=density)
    torch.testing.assert_close(out.double(), expected("ties", base, others, params),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", [m for m in FAST if METHODS[m].fast.stored_dtype_inputs])
@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
def test_stored_dtype_inputs_give_the_float32_result(method, narrow, block):
    """Fast paths that take base and fine-tunes in their stored dtype upcast exactly: the result
    is bit-identical to passing the float32 copies (bf16 - bf16 in torch would round in bf16)."""
    gen = torch.Generator().manual_seed(5)
    base = (torch.randn(40, 30, generator=gen) * 0.02).to(narrow)
    others = [(base.float() + torch.randn(40, 30, generator=gen) * 1e-3).to(narrow)
              for _ in range(3)]
    narrow_out, _ = run(method, base, others, "fast", **OVERRIDES[method])
    wide_out, _ = run(method, base.float(), [o.float() for o in others], "fast",
                      **OVERRIDES[method])
    assert narrow_out.dtype == torch.float32 and torch.equal(narrow_out, wide_out)


@pytest.mark.parametrize("path", ["dense", "fast"])
def test_ties_trim_with_blocks_splitting_a_run_of_ties(path, block):
    base = torch.zeros(40)
    other = torch.tensor([1.0, 2.0] * 20)  # 20 ties at 2 and 20 at 1
    out, _ = run("ties", base, [other], path, density=0.3)  # k = 12 of the 20 twos
    assert torch.equal(out, torch.where((other == 2) & (torch.arange(40) < 24), other, 0.0))


@pytest.mark.parametrize("path", ["dense", "fast"])
def test_density_too_small_names_the_flag(path):
    base, others = family()
    with pytest.raises(UserError, match="--density: density 0.001 too small for tensor of 120"):
        run("ties", base, others, path, density=0.001)


@pytest.mark.parametrize("path", ["dense", "fast"])
def test_mergekit_trim_keeps_at_least_one_entry(path):
    """mergekit_trim (§19.3): k = max(1, floor(density*n)); where the CLI rule would keep none
    of the 20 entries, the largest |delta| (13, the last entry) stays, in the float64 box too."""
    base, other = torch.zeros(4, 5), torch.arange(20.0).view(4, 5) - 6
    want = torch.zeros(4, 5)
    want[3, 4] = 13.0
    out, params = run("ties", base, [other], path, density=0.01, mergekit_trim=True)
    assert torch.equal(out, want)
    assert torch.equal(expected("ties", base, [other], params), want.double())


def test_ties_l1_rescale_restores_the_norm():
    base, (other,) = family(n=1)
    out, _ = run("ties", base, [other], density=0.25, rescale=True)
    torch.testing.assert_close((out - base).abs().sum(), (other - base).abs().sum())


def test_negative_weights_cancel_under_ties_normalize():
    """§3.2 note: with normalize a negative weight does not negate under TIES."""
    base, (other,) = family(n=1)
    plus, _ = run("ties", base, [other], weights=1.0)
    minus, _ = run("ties", base, [other], weights=-1.0)
    assert torch.equal(plus, minus)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_an_exactly_zero_sign_sum_elects_plus_one(method):
    """§0.6 with weights 0.6 and bf16 deltas d, -d: each product 0.6*d is rounded to float32, so
    the sum is exactly 0 and elects +1 (the positive delta wins). A fused multiply-add gave
    ±tiny sums and elected -1 for about half the elements."""
    torch.manual_seed(0)
    d = torch.randn(4096).bfloat16().float()
    base = torch.zeros_like(d)
    out, _ = run(method, base, [base + d, base - d], density=1.0, weights=0.6, normalize=True)
    assert (out >= 0).all()
    torch.testing.assert_close(out, d.abs(), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- DARE
@pytest.mark.parametrize("path", ["dense", "fast"])
def test_dare_mask_is_mask_rule_2(path, block):
    base, (other,) = family(n=1, shape=(33, 31))
    out, _ = run("dare_linear", base, [other], path, density=0.4, rescale=False)
    kept = reference.dare_mask(SEED, 0, NAME, 0.4, base.numel())[0].view(base.shape) == 1
    assert torch.equal(out, torch.where(kept, other, base))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("mode", ["inverse_density", "l1"])
def test_keep_masks_drawn_ahead_equal_the_blocked_draws(method, mode, block):
    """Masks drawn at once per model (the runner draws them on its I/O thread) give the result
    of the per-block draws; a model with density 1 needs no mask."""
    base, others = family(shape=(33, 31))
    density = [0.4, 1.0, 0.7]
    want, params = run(method, base, others, density=density, rescale_mode=mode)
    masks = [reference.dare_mask(SEED, i, NAME, d, base.numel())[0].float()
             if d < 1 else None for i, d in enumerate(density)]
    got = METHODS[method].fast.fn(base, others, **params, **context(method, 3), keep_masks=masks)
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("masks", ["kernel", "numpy"])
def test_a_row_chunk_with_its_offset_draws_the_whole_tensors_masks(method, masks, block,
                                                                   request):
    """Rows 10-20 merged alone with `mask_offset` (their flat offset: how the runner merges a
    row chunk whose masks are drawn in the merge, by the compiled kernel or on an
    accelerator) are those rows of the whole tensor's merge."""
    if masks == "numpy":
        request.getfixturevalue("numpy_masks")
    elif primitives.native_keep_mul() is None:
        pytest.skip("the compiled mask kernel is not available here")
    base, others = family(shape=(33, 31))
    want, params = run(method, base, others, "fast", density=[0.4, 0.7, 0.9])
    got = METHODS[method].fast.fn(base[10:21], [o[10:21] for o in others], **params,
                                  **context(method, 3), mask_offset=10 * 31)
    assert torch.equal(got, want[10:21])


def test_dare_kept_entries_equal_delta_over_the_density_used():
    """Rescaled by the quantised density: round(0.3 · 65536) / 65536 = 19661 / 65536."""
    delta = family(n=1)[1][0]
    zero = torch.zeros_like(delta)
    out, _ = run("dare_linear", zero, [delta], density=0.3)
    kept = out != 0
    assert 0 < int(kept.sum()) < delta.numel()
    torch.testing.assert_close(out[kept], delta[kept] / (19661 / 65536), rtol=1e-7, atol=0)


def test_dare_l1_mode_matches_the_l1_norm():
    base, (other,) = family(n=1)
    out, _ = run("dare_linear", base, [other], density=0.3, rescale_mode="l1")
    torch.testing.assert_close((out - base).abs().sum(), (other - base).abs().sum())


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_same_seed_same_result_new_seed_new_result(method):
    base, others = family()
    params = resolved(method, 3, density=0.5)

    def merge(seed):
        keys = [mask_key(seed, i, NAME) for i in range(3)]
        return METHODS[method].fn(base, others, **params, mask_keys=keys)

    assert torch.equal(merge(1), merge(1))
    assert not torch.equal(merge(1), merge(2))


def test_mask_generator_is_keyed_by_seed_model_and_name():
    draws = {key: torch.rand(4, generator=mask_generator(*key)).tolist()
             for key in [(0, 0, "a"), (0, 1, "a"), (1, 0, "a"), (0, 0, "b")]}
    assert len({tuple(v) for v in draws.values()}) == 4
    assert draws[(0, 0, "a")] == torch.rand(4, generator=ref_generator(0, 0, "a")).tolist()


# ----------------------------------------------------------------------------- WIDEN
def test_widen_column_important_everywhere_gets_calibration_value():
    """§5.2: a column in the top half of both rankings for every model gets w = s."""
    gen = torch.Generator().manual_seed(5)
    base = grid((6, 5), 1 / 8, gen) + 4.0
    others = [base + grid((6, 5), 1 / 4096, gen) for _ in range(2)]
    for o in others:
        o[:, 4] = base[:, 4] * 1.5 + grid((6,), 1 / 8, gen)  # big change in norm and direction
    out = widen(base, others, score_calibration_value=0.7)
    expected = base[:, 4].double() + 0.7 * sum(o[:, 4].double() - base[:, 4] for o in others)
    torch.testing.assert_close(out[:, 4], expected.float())


def test_widen_column_unimportant_everywhere_averages_its_deltas():
    """§5.2: softmax weights of an unimportant column sum to 1 (identical deltas come back once)."""
    gen = torch.Generator().manual_seed(6)
    base = grid((6, 5), 1 / 8, gen) + 4.0
    others = [base + grid((6, 5), 1 / 16, gen) for _ in range(3)]
    tiny = grid((6,), 1 / 2**14, gen)
    for o in others:
        o[:, 2] = base[:, 2] + tiny  # the smallest change of every model, in both rankings
    out = widen(base, others)
    torch.testing.assert_close(out[:, 2], (base[:, 2].double() + tiny.double()).float())


@pytest.mark.parametrize("n, ratio, important", [
    (5, 1.0, [3, 4]), (5, 0.5, [2, 3, 4]), (49, 1.0, list(range(25, 49))), (1, 1.0, []),
])
def test_widen_importance_is_2k_greater_than_t_times_n_minus_1(n, ratio, important):
    values = torch.arange(n, dtype=torch.float32).flip(0).unsqueeze(0)  # rank k at column n-1-k
    scores = rank_scores(values, ratio, calibration=9.0)[0].flip(0)
    assert [k for k in range(n) if scores[k] == 9.0] == important


def test_widen_ranks_ties_by_lower_column_first():
    values = torch.tensor([[0.5, 0.5, 0.5, 0.1]])  # ranks 1, 2, 3, 0
    assert rank_scores(values, 1.0, 9.0)[0].tolist() == [1.0, 9.0, 9.0, 1.0]


@pytest.mark.parametrize("shape, is_input_embedding", [((40,), False), ((9, 7), True)],
                         ids=["vector", "input embedding"])
def test_widen_fast_path_on_vectors_and_embeddings(shape, is_input_embedding):
    """widen_held returns `widen`'s bits (on float32 copies) from stored bf16 inputs, into the
    given buffer, where the fast-path suite does not look: a 1-D tensor (norm weights) goes to
    the elementwise rule (§5.3), not to the matrix form's units, and an input embedding is
    scored per token through the two-pass form."""
    gen = torch.Generator().manual_seed(5)
    base = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
    others = [(base.float() + torch.randn(shape, generator=gen) * 1e-3).bfloat16()
              for _ in range(3)]
    params = {"above_average_value_ratio": 0.8, "score_calibration_value": 0.6,
              "is_input_embedding": is_input_embedding}
    dense = widen(base.float(), [o.float() for o in others], **params)
    buffer = torch.full(shape, float("nan"))
    fast = widen_held(base, others, out=buffer, **params)
    assert fast.data_ptr() == buffer.data_ptr() and torch.equal(bits(fast), bits(dense))


def test_widen_input_embedding_scores_tokens():
    base, others = family(shape=(7, 4))
    out = widen(base, others, is_input_embedding=True)
    torch.testing.assert_close(out.double(), reference.widen(base, others, is_input_embedding=True),
                               rtol=1e-5, atol=1e-6)
    transposed = widen(base.T.contiguous(), [o.T.contiguous() for o in others])
    torch.testing.assert_close(out, transposed.T)


@pytest.mark.parametrize("shape", [(10,), (), (3, 2, 4)])
def test_widen_other_ranks(shape):
    base, others = family(shape=shape)
    torch.testing.assert_close(widen(base, others).double(), reference.widen(base, others),
                               rtol=1e-5, atol=1e-6)


def test_widen_zero_columns_follow_the_clamped_formula():
    base, others = family(shape=(6, 5))
    base[:, 1] = 0.0
    others[0][:, 3] = 0.0
    out = widen(base, others)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference.widen(base, others),
                               rtol=1e-5, atol=1e-6)


def test_direction_change_by_hand():
    """1 - cos per column: orthogonal 1, zero base column 1 (cos taken as 0), flipped 2, same 0,
    and a 1e-4 rad turn keeps its relative precision (literal float32 1 - cos would give 0)."""
    w0 = torch.tensor([[1.0, 0.0, 2.0, 3.0, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0]])
    wi = torch.tensor([[0.0, 1.0, -2.0, 3.0, 1.0], [5.0, 1.0, -1.0, 1.0, 1e-4]])
    expected = torch.tensor([1.0, 1.0, 2.0, 0.0, 5e-9])
    for transposed, (a, b) in [(False, (w0, wi)), (True, (w0.T.contiguous(), wi.T.contiguous()))]:
        magnitude, change = direction_change(a, b, units := Units(a, transposed), units.norms(a))
        torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(magnitude, torch.tensor([4.0, 2**0.5, 0.0, 0.0, 5e-9]),
                                   rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- registry
def test_defaults_are_mergekits():
    assert METHODS["ties"].defaults["normalize"] is True
    assert METHODS["dare_ties"].defaults["normalize"] is False
    assert METHODS["dare_linear"].defaults["rescale"] is True
    assert METHODS["linear"].defaults["normalize"] is True
    assert METHODS["dare_ties"].stochastic and not METHODS["ties"].stochastic


def test_unknown_method_lists_the_choices():
    with pytest.raises(UserError, match=r"--method: unknown method 'tie'; choose one of .*ties"):
        get_method("tie")


@pytest.mark.parametrize("method, params, flag", [
    ("ties", {"density": [0.0, 0.5]}, "--density"),
    ("dare_ties", {"density": 1.5}, "--density"),
    ("dare_ties", {"density": [0.5, 1e-6]}, "--density"),  # rounds to 0 at 1/65536
    ("ties", {"weights": [1.0, 1.0, 1.0]}, "--weights"),
    ("task_arithmetic", {"density": 0.5}, "--density"),
    ("widen", {"weights": 1.0}, "--weights"),
    ("linear", {"weights": [1.0, -1.0]}, "--weights"),
    ("dare_linear", {"rescale_mode": "l2"}, "--rescale_mode"),
    ("ties", {"scaling": float("nan")}, "--lambda"),
    ("ties", {"normalize": "yes"}, "--normalize"),
    ("widen", {"above_average_value_ratio": 0.0}, "--above_average_value_ratio"),
    ("widen", {"score_calibration_value": -1.0}, "--score_calibration_value"),
])
def test_invalid_params_name_the_flag(method, params, flag):
    with pytest.raises(UserError, match=f"^{flag}"):
        METHODS[method].resolve(params, n_models=2)


def test_valid_params_resolve_with_defaults_filled_in():
    assert resolved("dare_ties", 2, density=[0.2, 1.0]) == {
        "weights": [1.0, 1.0], "scaling": 1.0, "density": [0.2, 1.0], "normalize": False,
        "rescale": True, "rescale_mode": "inverse_density"}
    assert resolved("linear", 2, weights=[1.0, -1.0], normalize=False)["weights"] == [1.0, -1.0]


def test_warnings_for_negative_weights_with_normalize():
    assert method_warnings(METHODS["task_arithmetic"], {"weights": [1.0, -0.5]}) == []
    [note] = method_warnings(METHODS["task_arithmetic"],
                             {"weights": [1.0, -0.5], "normalize": True})
    assert "negative" in note and "--no-normalize" in note
    [note] = method_warnings(METHODS["ties"], {"weights": [1.0, -0.5]})
    assert "cancels" in note
