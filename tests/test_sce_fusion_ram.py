"""sce, nearswap, arcee_fusion, ram and ramplus_tl (mergekit 0.1.5, ALGORITHMS.md §19.7-§19.10):
the spec's worked examples and rules computed by hand, the float64 paper boxes of reference.py
on fp32 and bf16 inputs, and merge.py end to end from flags and from mergekit YAML.

(The generic tests of tests/test_methods.py, test_merge_cli.py, test_merge_config_cli.py and
test_new_methods_cli.py cover them too: fast path = dense bits, streamed = in-memory, recipe
file reproduces, inline AIM = post-hoc, tied, loads in transformers.)
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import merge
from checkpoints import rows
from checkpoints.errors import UserError
from merging_methods import arcee_fusion as arcee_module
from merging_methods import ram as ram_module
from merging_methods import reference
from merging_methods import sce as sce_module
from merging_methods.arcee_fusion import (SAMPLE_SIZE, arcee_fusion, fusion_threshold,
                                          ranked_values, row_kl)
from merging_methods.mergekit_plan import POST, method_params, resolve
from merging_methods.nearswap import nearswap
from merging_methods.ram import ram, ramplus_tl
from merging_methods.registry import METHODS
from merging_methods.sce import sce
from tests.test_merge_cli import assert_user_error, family, load_weights  # noqa: F401
from tests.test_mergekit_config import plan_of


def inputs(n, shape=(16, 12), dtype=torch.float32, seed=0):
    """A base and n fine-tunes 0.05 away, rounded to `dtype` (as stored), as float32."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    others = [base + 0.05 * torch.randn(shape, generator=gen) for _ in range(n)]
    return base.to(dtype).float(), [o.to(dtype).float() for o in others]


def dyadic(n, shape=(6, 5), seed=0):
    """Values on a grid of 1/64 (deltas exact in float32), with some zero deltas."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-64, 65, shape, generator=gen) / 64
    return base, [base + torch.randint(-3, 4, shape, generator=gen) / 64 for _ in range(n)]


# ----------------------------------------------------------------------------- vs reference
SETTINGS = [  # (method, models, parameters)
    ("sce", 3, {}), ("sce", 3, {"select_topk": 0.3}), ("sce", 1, {}),
    ("nearswap", 1, {"t": 0.03}),
    ("arcee_fusion", 1, {}),
    ("ram", 3, {"ram_epsilon": 0.02}),
    ("ramplus_tl", 3, {"ram_epsilon": 0.02}),
    ("ramplus_tl", 2, {"ram_epsilon": 0.04, "ramplus_r": 0.5, "ramplus_alpha": 3.0}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method, n, params", SETTINGS,
                         ids=[f"{m}-{n}" + "".join(f"-{k}={v}" for k, v in p.items())
                              for m, n, p in SETTINGS])
def test_matches_the_float64_reference(method, n, params, dtype):
    base, others = inputs(n, dtype=dtype)
    if "select_topk" in params:
        variance = torch.stack([o.double() - base.double() for o in others]).var(0, unbiased=False)
        k = math.floor(params["select_topk"] * int((variance != 0).sum()))
        ranked = variance.flatten().sort(descending=True).values
        assert ranked[k - 1] > ranked[k] * (1 + 1e-4)  # no near-tie at the cut (float32 vs 64)
    spec = METHODS[method]
    values = spec.resolve(params, n)
    out = spec.fn(base, others, **values)
    assert out.dtype == torch.float32 and out.shape == base.shape
    want = getattr(reference, method)(base, others, **values)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(out, base)  # the setting does move the base


BLOCKED = [("sce", 3, {"select_topk": 0.3}), ("arcee_fusion", 1, {}),
           ("ramplus_tl", 3, {"ram_epsilon": 0.02})]


@pytest.mark.parametrize("method, n, params", BLOCKED, ids=[m for m, _, _ in BLOCKED])
def test_many_small_blocks_give_the_one_block_result(method, n, params, monkeypatch):
    """Blocks of 7 entries (sce, ramplus_tl), pieces of one row (arcee_fusion) and streamed
    chunks of two rows split the tensor where the tests' tensors are otherwise one block: the
    same bits (sce: ω is summed per block, so to float32 rounding), and still the float64
    paper box."""
    base, others = inputs(n)
    values = METHODS[method].resolve(params, n)
    whole = METHODS[method].fn(base, others, **values)
    monkeypatch.setattr(sce_module, "block_size", lambda device: 7)
    monkeypatch.setattr(ram_module, "block_size", lambda device: 7)
    monkeypatch.setattr(arcee_module, "ROW_CHUNK", 20)
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 24)
    blocked = METHODS[method].fn(base, others, **values)
    if method == "sce":
        torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(blocked, whole)
    torch.testing.assert_close(blocked.double(), getattr(reference, method)(base, others, **values),
                               rtol=1e-5, atol=1e-6)


def test_arcee_fusion_selected_quantiles_are_the_sorted_entries():
    """The radix select over blocks: tied integers, signed values with ±0 and a rank at each
    end, equal to the sorted entries."""
    gen = torch.Generator().manual_seed(3)
    tied = torch.randint(0, 9, (1001,), generator=gen).float()
    signed = torch.cat([torch.randn(500, generator=gen), torch.tensor([0.0, -0.0] * 3)])
    for flat in (tied, signed):
        n = flat.numel()
        positions = [0, n // 4, n // 4 + 1, n // 2, 3 * n // 4, n - 1]
        got = ranked_values(lambda: flat.split(97), positions)
        assert torch.equal(torch.stack(got), flat.sort().values[positions])


@pytest.mark.parametrize("fn", [sce, nearswap, arcee_fusion, ram, ramplus_tl],
                         ids=lambda fn: fn.__name__)
def test_signatures_follow_the_contract(fn):
    """(base, others, *, the row's parameters by name); only arcee_fusion takes a context
    keyword (`generators`, for its mergekit sample)."""
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:2]] == ["base", "others"]
    assert all(p.kind is p.KEYWORD_ONLY for p in params[2:])
    spec = METHODS[fn.__name__]
    assert {p.name for p in params[2:]} == set(spec.params) | spec.context
    assert spec.context == ({"generators"} if fn is arcee_fusion else set())


# ----------------------------------------------------------------------------- sce (§19.7)
D1 = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.1, 3.0]])
D2 = torch.tensor([[2.0, 1.0, 0.0], [-0.5, 0.2, -1.0]])


def test_sce_worked_example():
    """ω = (14.26, 6.29)/6 normalised; (0, 0): both +, (0.6939·1 + 0.3061·2) = 1.3061; (1, 1):
    both +, 0.6939·0.1 + 0.3061·0.2 = 0.13061; (0, 1): sum −1, only −2 agrees."""
    w1, w2 = 14.26 / 20.55, 6.29 / 20.55
    want = torch.tensor([[w1 * 1 + w2 * 2, -2.0, 0.0], [0.5, w1 * 0.1 + w2 * 0.2, 3.0]])
    torch.testing.assert_close(sce(torch.zeros(2, 3), [D1, D2]), want)
    assert abs(want[0, 0] - 1.3061) < 1e-4


def test_sce_worked_example_with_select_topk():
    """σ² = [0.25, 2.25, 0, 0.25, 0.0025, 4]: 5 non-zero, K = 2 keeps (1, 2) and (0, 1)."""
    out = sce(torch.zeros(2, 3), [D1, D2], select_topk=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.0, -2.0, 0.0], [0.0, 0.0, 3.0]]))
    assert int((out != 0).sum()) == 2


def test_sce_of_one_model_is_that_model_and_selecting_keeps_nothing():
    base, (other,) = dyadic(1)
    assert torch.equal(sce(base, [other]), other)
    assert torch.equal(sce(base, [other], select_topk=0.5), base)  # σ² = 0 everywhere: K = 0


@pytest.mark.parametrize("select_topk", [0.0, -1.0])
def test_sce_select_topk_at_most_zero_gives_the_base(select_topk):
    base, others = dyadic(3)
    assert torch.equal(sce(base, others, select_topk=select_topk), base)


def test_sce_variance_ties_keep_the_lower_index():
    """σ² = [1, 1, 1, 25]: K = floor(0.5·4) = 2 keeps entry 3 and, of the tied ones, entry 0;
    zero sign sums elect +1, so the positive delta is taken there."""
    d1, d2 = torch.tensor([1.0, 2.0, -1.0, 5.0]), torch.tensor([-1.0, 0.0, 1.0, -5.0])
    out = sce(torch.zeros(4), [d1, d2], select_topk=0.5)
    assert torch.equal(out, torch.tensor([1.0, 0.0, 0.0, 5.0]))


def test_sce_variance_is_the_float64_one_in_any_model_order():
    """σ² of bf16-grid deltas: the float64 population variance rounded to float32, with the
    same bits for every order of the models (so ties stay ties for the stable rule)."""
    deltas = (torch.randn(3, 4000, generator=torch.Generator().manual_seed(2)) * 1e-3
              ).bfloat16().float()
    want = deltas.double().var(0, unbiased=False).float()
    mean, deviations = torch.empty(4000, dtype=torch.float64), torch.empty(3, 4000,
                                                                          dtype=torch.float64)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        got = sce_module.variance_(deltas[order], torch.empty(4000), mean, deviations)
        assert torch.equal(got, want)


def test_sce_ties_across_chunks_keep_the_lower_index(monkeypatch):
    """4 models of integer deltas (σ² exact in float32, long runs of equal σ², the cut inside
    one), chunks of one row and blocks of 5 entries: the kept entries are the float64 paper
    box's stable top-K, though the run of kept ties ends in a later chunk than it starts."""
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 7)
    monkeypatch.setattr(sce_module, "block_size", lambda device: 5)
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(-3, 4, (13, 7), generator=gen).float()
    others = [base + torch.randint(-2, 3, (13, 7), generator=gen) for _ in range(4)]
    variance = torch.stack(others).var(0, unbiased=False).flatten().double()
    k = math.floor(0.4 * int(variance.count_nonzero()))
    ranked = variance.sort(descending=True).values
    tied = (variance == ranked[k - 1]).nonzero().flatten()
    assert ranked[k] == ranked[k - 1] and tied[-1] // 7 > tied[0] // 7
    want = reference.sce(base, others, select_topk=0.4)
    torch.testing.assert_close(sce(base, others, select_topk=0.4).double(), want, rtol=1e-6,
                               atol=1e-6)


# ----------------------------------------------------------------------------- nearswap (§19.8)
def test_nearswap_worked_example_dense_and_fast():
    base, other = torch.zeros(3), torch.tensor([0.05, 0.2, -1.0])
    want = torch.tensor([0.05, 0.1, -0.1])
    torch.testing.assert_close(nearswap(base, [other], t=0.1), want)
    fast = METHODS["nearswap"].fast.fn
    assert torch.equal(fast(base, [other], t=0.1), nearswap(base, [other], t=0.1))


@pytest.mark.parametrize("t", [0.0, -0.5])
def test_nearswap_threshold_at_most_zero_returns_the_base(t):
    base, (other,) = dyadic(1)
    assert torch.equal(nearswap(base, [other], t=t), base)


@pytest.mark.parametrize("t", [1 / 64, 2.5 / 64, 1.0])
def test_nearswap_is_the_clip_form(t):
    """out = θ0 + clip(θ1 − θ0, −t, t); entries closer than t are θ1 exactly."""
    base, (other,) = dyadic(1)
    delta = other - base
    out = nearswap(base, [other], t=t)
    torch.testing.assert_close(out, base + delta.clamp(-t, t), rtol=0, atol=1e-7)
    near = delta.abs() <= t
    assert torch.equal(out[near], other[near]) and bool((~near).any() or t == 1.0)


# ----------------------------------------------------------------------------- arcee_fusion
def test_arcee_fusion_threshold_reads_the_lower_quantiles():
    """One row: κ is one positive scalar, so I ≥ τ ⟺ |δ| ≥ τ/κ. Sorted |δ| = [0, 1, 2, 6, 7,
    12]/100, M = 6: q(0.5) = s[2], q(0.25) = s[1], q(0.75) = s[3], τ/κ = 2 + 1.5·(6 − 1) = 9.5,
    so only 12 passes (interpolated quantiles would give 12.25 and keep nothing)."""
    base = torch.tensor([0.5, -0.25, 0.125, 1.0, 0.0, -0.5])
    delta = torch.tensor([0.06, -0.01, 0.0, 0.12, -0.07, 0.02])
    out = arcee_fusion(base, [base + delta])
    want = base.clone()
    want[3] = base[3] + delta[3]
    assert torch.equal(out, want)


def test_arcee_fusion_weighs_by_each_rows_distribution_change():
    """Row 0 moves by a constant (its softmax is unchanged, κ ≈ 0): it stays at the base
    however large the move; the most important entries of row 1 are taken."""
    base = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.5, -0.5, 1.0]])
    delta = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.01, -0.3, 0.02, 0.4]])
    out = arcee_fusion(base, [base + delta])
    assert torch.equal(out[0], base[0])
    taken = out[1] != base[1]
    assert taken.tolist() == [False, True, False, True]
    assert torch.equal(out[1][taken], (base[1] + delta[1])[taken])


def test_arcee_fusion_row_kl_is_accurate_in_float32_for_close_rows():
    """Rows of a fine-tune 1e-3 away (a real fine-tune's scale): the float32 KL is within 0.1%
    of the float64 one (the literal Σ P·log(P/Q) in float32 is off by tens of percent here)."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(8, 256, generator=gen) * 0.02
    other = base + torch.randn(8, 256, generator=gen) * 1e-3
    p, q = torch.softmax(other.double(), -1) + 1e-8, torch.softmax(base.double(), -1) + 1e-8
    want = (p * torch.log(p / q)).sum(-1, keepdim=True)
    torch.testing.assert_close(row_kl(base, other).double(), want, rtol=1e-3, atol=0)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_arcee_fusion_sampled_threshold_is_mergekits_rule_and_seeded():
    """Above 10^6 entries: the quantiles of 10^6 entries drawn with replacement from the
    generator; the same seed gives the same bits, another seed another threshold."""
    importance = torch.rand(1001, 1000, generator=generator(0))
    picks = torch.randint(importance.numel(), (SAMPLE_SIZE,), generator=generator(3))
    ordered = importance.flatten()[picks].double().sort().values
    q = [float(ordered[math.floor(phi * (SAMPLE_SIZE - 1))]) for phi in (0.25, 0.5, 0.75)]
    want = q[1] + 1.5 * (q[2] - q[0])
    n = importance.numel()
    halves = [(0, importance[:500].flatten()), (500 * 1000, importance[500:].flatten())]
    chunks = lambda: halves  # noqa: E731  (two chunks: the draws are gathered from both)
    got = fusion_threshold(chunks, n, "mergekit", generator(3))
    assert abs(float(got) - want) < 1e-6
    assert torch.equal(got, fusion_threshold(chunks, n, "mergekit", generator(3)))
    others = {float(fusion_threshold(chunks, n, mode, generator(seed)))
              for mode, seed in (("mergekit", 4), ("exact", 3))}
    assert float(got) not in others


def test_arcee_fusion_sampled_equals_exact_up_to_a_million_entries():
    base, (other,) = inputs(1, shape=(40, 25))
    exact = arcee_fusion(base, [other])
    sampled = arcee_fusion(base, [other], arcee_fusion_sample="mergekit",
                           generators=[generator(9)])
    assert torch.equal(sampled, exact) and not torch.equal(exact, base)


# ----------------------------------------------------------------------------- ram (§19.10)
RAM_BASE = torch.zeros(6)
RAM_D1 = torch.tensor([1.0, 0.0, 2.0, 0.0, 1e-6, 3.0])
RAM_D2 = torch.tensor([0.0, 0.0, 4.0, 5.0, 0.0, -3.0])


def test_ram_worked_example_dense_and_fast():
    want = torch.tensor([1.0, 0.0, 3.0, 5.0, 0.0, 0.0])
    assert torch.equal(ram(RAM_BASE, [RAM_D1, RAM_D2]), want)
    assert torch.equal(METHODS["ram"].fast.fn(RAM_BASE, [RAM_D1, RAM_D2], ram_epsilon=1e-5), want)


def test_ramplus_tl_worked_example():
    """Each model: 2 shared, 1 unique active entry, ρ = 2, clamped to 0.2: λ = 1.02."""
    want = torch.tensor([1.02, 0.0, 3.0, 5.1, 0.0, 0.0])
    torch.testing.assert_close(ramplus_tl(RAM_BASE, [RAM_D1, RAM_D2]), want)


def test_ram_drops_inactive_deltas_where_others_are_active():
    """|4e-6| <= ε: the position is model 1's alone (not the mean of 1 and 4e-6); with ε = 0
    both are active and averaged."""
    base, d1, d2 = torch.zeros(1), torch.tensor([1.0]), torch.tensor([4e-6])
    assert torch.equal(ram(base, [d1, d2]), d1)
    assert torch.equal(ram(base, [d1, d2], ram_epsilon=0.0), (d1 + d2) / 2)


@pytest.mark.parametrize("alpha, boost", [(0.6, 1.3), (2.0, 1.5)])
def test_ramplus_tl_boost_is_one_plus_r_times_the_capped_ratio(alpha, boost):
    """Model 2 is active at one shared and one unique entry: ρ = 1, λ = 1 + 0.5·min(1, alpha)
    on its unique entry; the shared entry is the plain mean."""
    base = torch.zeros(3)
    d1, d2 = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([4.0, 1.0, 0.0])
    out = ramplus_tl(base, [d1, d2], ramplus_r=0.5, ramplus_alpha=alpha)
    torch.testing.assert_close(out, torch.tensor([3.0, boost, 0.0]))


# ----------------------------------------------------------------------------- end to end
CLI_CASES = {  # method -> (models, flags, mergekit YAML parameters)
    "sce": (3, ["--select_topk", "0.4"], "{select_topk: 0.4, int8_mask: true}"),
    "nearswap": (1, ["--t", "0.0005"], "{t: 0.0005}"),
    "arcee_fusion": (1, [], "{}"),
    "ram": (2, ["--ram_epsilon", "0.0003"], "{epsilon: 3e-4}"),
    "ramplus_tl": (3, ["--ram_epsilon", "0.0003", "--ramplus_r", "0.4", "--ramplus_alpha", "1"],
                   "{epsilon: 0.0003, r: 0.4, alpha: 1.0}"),
}


@pytest.mark.parametrize("method", sorted(CLI_CASES))
def test_flags_and_mergekit_yaml_give_the_same_merge(family, tmp_path, method):  # noqa: F811
    base, fts = family
    n, flags, params = CLI_CASES[method]
    models = fts[:n]
    cli, yml = tmp_path / "cli", tmp_path / "yml"
    assert merge.main(["--method", method, "--base_model", str(base), "--models_to_merge",
                       ",".join(map(str, models)), "--save_path", str(cli), *flags]) == 0
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
                      + "".join(f"  - model: {m}\n" for m in models)
                      + f"parameters: {params}\n")
    assert merge.main(["--config", str(config), "--save_path", str(yml)]) == 0
    got, want, b = load_weights(yml), load_weights(cli), load_weights(base)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], b[k]) for k in b)


def run_cli(tmp_path, method, models, *flags) -> int:
    return merge.main(["--method", method, "--base_model", str(models[0]), "--models_to_merge",
                       ",".join(map(str, models[1:])), "--save_path", str(tmp_path / "o"),
                       *flags])


@pytest.mark.parametrize("method, n, flags, fragment", [
    ("nearswap", 1, [], "--t: required by this method (it has no default)"),
    ("nearswap", 2, ["--t", "0.1"], "nearswap takes exactly 1 model(s) besides --base_model"),
    ("arcee_fusion", 2, [], "arcee_fusion takes exactly 1 model(s)"),
    ("arcee_fusion", 1, ["--arcee_fusion_sample", "some"],
     "--arcee_fusion_sample: expected one of exact, mergekit"),
    ("ram", 2, ["--epsilon", "0.1"], "--epsilon does not apply to --method ram; it takes "
                                     "--ram_epsilon"),
    ("ramplus_tl", 2, ["--ramplus_alpha", "-1"], "--ramplus_alpha: -1 is outside the allowed"),
])
def test_bad_settings_are_one_line_errors(family, tmp_path, capsys, method, n, flags,  # noqa: F811
                                          fragment):
    base, fts = family
    assert_user_error(capsys, run_cli(tmp_path, method, [base, *fts[:n]], *flags), fragment)


def test_yaml_nearswap_needs_t_and_ram_epsilon_is_shared():
    plan = plan_of("merge_method: nearswap\nbase_model: b\nmodels:\n  - model: m\n", 2)
    with pytest.raises(UserError, match="missing required parameter 't'"):
        resolve(plan, "lm_head.weight", POST)
    with pytest.raises(UserError, match="'epsilon' is shared by all models"):
        plan_of("merge_method: ram\nbase_model: b\nmodels:\n  - model: m\n"
                "    parameters: {epsilon: 0.1}\n", 2)


def test_yaml_epsilon_is_ram_epsilon_for_ram_and_per_model_for_della():
    """The YAML key `epsilon` names two parameters: ram's shared threshold and della's
    per-model window."""
    ram_plan = plan_of("merge_method: ramplus_tl\nbase_model: b\nmodels:\n  - model: m\n"
                       "parameters: {epsilon: 0.01, r: 0.3}\n", 2)
    assert method_params(resolve(ram_plan, "lm_head.weight", POST)) == {
        "ram_epsilon": 0.01, "ramplus_r": 0.3, "ramplus_alpha": 0.2}
    della = plan_of("merge_method: della\nbase_model: b\nmodels:\n  - model: m\n"
                    "    parameters: {weight: 1, density: 0.5, epsilon: 0.2}\n", 2)
    assert method_params(resolve(della, "lm_head.weight", POST))["epsilon"] == [0.2]


def test_yaml_sce_accepts_weight_and_int8_mask_with_no_effect():
    """mergekit's sce has no per-model weights (§19.7) and ignores `weight`; int8_mask is a
    memory option."""
    plan = plan_of("merge_method: sce\nbase_model: b\nmodels:\n  - model: m\n"
                   "    parameters: {weight: 0.3}\n  - model: n\n"
                   "parameters: {int8_mask: true, select_topk: 0.5}\n", 2)
    assert method_params(resolve(plan, "lm_head.weight", POST)) == {"select_topk": 0.5}
