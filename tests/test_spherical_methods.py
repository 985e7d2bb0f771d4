"""nuslerp, multislerp and karcher (ALGORITHMS.md §19.4-19.6): against the float64 paper boxes
in merging_methods/reference.py (fp32 and bf16-rounded inputs), the properties the spec states,
worked examples by hand, and end to end through merge.py's flags and mergekit YAML (both base
modes of nuslerp/multislerp, karcher's averaged-in base, required parameters)."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import yaml

from checkpoints import rows
from checkpoints.errors import UserError
from merging_methods import reference
from merging_methods.karcher import karcher
from merging_methods.multislerp import multislerp
from merging_methods.nuslerp import nuslerp
from merging_methods.registry import METHODS
from merging_methods.slerp import slerp
from tests.test_merge_cli import assert_user_error, load_weights
from tests.test_merge_config_cli import models, run, write  # noqa: F401 - models is a fixture
from tests.test_new_methods import family


def close(actual, expected, rtol=1e-5, atol=1e-6):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


GROUPINGS = {"flatten": {}, "rows": {"nuslerp_flatten": False},
             "columns": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}


# ----------------------------------------------------------------------------- nuslerp
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("task_vectors", [True, False], ids=["task", "plain"])
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_nuslerp_matches_reference(grouping, task_vectors, bf16):
    base, others = family(bf16=bf16, n=2)
    kw = dict(weights=[0.3, 0.9], task_vectors=task_vectors, **GROUPINGS[grouping])
    close(nuslerp(base, others, **kw), reference.nuslerp(base, others, **kw))


@pytest.mark.parametrize("grouping", ["rows", "columns"])
def test_nuslerp_groupings_of_a_3d_tensor_match_reference(grouping):
    base, others = family(shape=(3, 4, 5), seed=1, n=2)
    kw = dict(weights=[1.0, 0.5], **GROUPINGS[grouping])
    close(nuslerp(base, others, **kw), reference.nuslerp(base, others, **kw))


@pytest.mark.parametrize("t", [0.3, 0.75])
def test_nuslerp_without_base_equals_slerp_with_weights_1_minus_t_and_t(t):
    _, (a, b) = family(seed=2, n=2)
    cos = float(a.flatten() @ b.flatten() / (a.norm() * b.norm()))
    assert abs(cos) <= 0.9995
    out = nuslerp(torch.zeros_like(a), [a, b], weights=[1 - t, t], task_vectors=False)
    close(out, slerp(a, [b], t=t), rtol=1e-5, atol=1e-5)


def test_nuslerp_rows_and_columns_by_hand():
    """x = I, y = [[1, 1], [0, 1]], t = 0.5: a pair at 45° gives k·(x + y) with
    k = sin(π/8)/sin(π/4); a colinear pair is lerped."""
    x, y = torch.eye(2), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    k = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    plain = dict(weights=[1.0, 1.0], task_vectors=False, nuslerp_flatten=False)
    rows = nuslerp(x, [x, y], **plain)
    columns = nuslerp(x, [x, y], **plain, nuslerp_row_wise=True)
    close(rows, torch.tensor([[2 * k, k], [0.0, 1.0]]))         # row 1: (0,1) twice
    close(columns, torch.tensor([[1.0, k], [0.0, 2 * k]]))      # column 0: (1,0) twice


def test_nuslerp_quarter_circle_and_colinear_by_hand():
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    plain = dict(weights=[1.0, 3.0], task_vectors=False)          # t = 0.75
    close(nuslerp(x, [x, y], **plain), torch.tensor([math.cos(3 * math.pi / 8),
                                                      math.sin(3 * math.pi / 8)]))
    close(nuslerp(x, [x, 2 * x], **plain), 1.75 * x)            # colinear: lerp


def test_nuslerp_weights_summing_to_about_zero_give_t_one_half():
    base, others = family(seed=3, n=2)
    half = nuslerp(base, others, weights=[1.0, 1.0])
    assert torch.equal(nuslerp(base, others, weights=[1.0, -1.0]), half)
    assert torch.equal(nuslerp(base, others, weights=[4e-7, -5e-7]), half)
    assert not torch.equal(nuslerp(base, others, weights=[1.0, -0.5]), half)   # t = -1


def test_nuslerp_task_vectors_add_the_base_back():
    base, others = family(seed=4, n=2)
    deltas = [o - base for o in others]
    want = base + nuslerp(base, deltas, weights=[0.2, 0.6], task_vectors=False)
    close(nuslerp(base, others, weights=[0.2, 0.6]), want)


# ----------------------------------------------------------------------------- multislerp
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("task_vectors", [True, False], ids=["task", "plain"])
def test_multislerp_matches_the_literal_tangent_space_reference(task_vectors, normalize_weights,
                                                                 bf16):
    base, others = family(n=3, bf16=bf16)
    kw = dict(weights=[0.5, 1.0, 0.7], normalize_weights=normalize_weights,
              task_vectors=task_vectors)
    close(multislerp(base, others, **kw), reference.multislerp(base, others, **kw))


@pytest.mark.parametrize("task_vectors", [True, False], ids=["task", "plain"])
def test_multislerp_of_identical_models_is_that_model(task_vectors):
    base, (model, _) = family(n=2)
    out = multislerp(base, [model.clone() for _ in range(3)], weights=[0.2, 0.5, 0.3],
                     task_vectors=task_vectors)
    close(out, model)


def test_multislerp_of_one_model_returns_it_unchanged():
    base, (model, _) = family(n=2)
    assert torch.equal(multislerp(base, [model], weights=[0.3]), model)
    assert torch.equal(multislerp(base, [model], weights=[0.3], task_vectors=False), model)


@pytest.mark.parametrize("task_vectors", [True, False], ids=["task", "plain"])
def test_multislerp_raw_weights_scale_the_normalised_result_by_their_sum(task_vectors):
    base, others = family(n=3, seed=5)
    kw = dict(weights=[2.0, 5.0, 3.0], task_vectors=task_vectors)
    raw = multislerp(base, others, **kw, normalize_weights=False)
    unit = multislerp(base, others, **kw)
    offset = base if task_vectors else torch.zeros_like(base)
    close(raw - offset, 10 * (unit - offset), rtol=1e-5, atol=1e-5)


def test_multislerp_two_antipodal_models_fall_back_to_the_weighted_sum():
    """u2 = −u1 exactly (a zero base keeps v2 = −2·v1 exact), so m = 0: w1·v1 + w2·v2 with
    (w1, w2) = (0.5, 0.5) gives −0.5·v1."""
    _, (v1, _) = family(seed=6, n=2)
    zero = torch.zeros_like(v1)
    for task_vectors in (True, False):
        out = multislerp(zero, [v1, -2 * v1], weights=[1.0, 1.0], task_vectors=task_vectors)
        assert torch.equal(out, -0.5 * v1)
    close(out, reference.multislerp(zero, [v1, -2 * v1], weights=[1.0, 1.0]))


def test_multislerp_zero_mean_direction_of_three_models_names_the_tensor():
    _, (v1, _) = family(seed=7, n=2)
    zero = torch.zeros_like(v1)
    with pytest.raises(UserError, match="multislerp: tensor w: the weighted mean of the unit"):
        multislerp(zero, [v1, -v1, zero], weights=[1.0, 1.0, 1.0], tensor_name="w")


# ----------------------------------------------------------------------------- karcher
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n, settings", [(3, {}), (4, {"max_iter": 3}), (3, {"tol": 1e-3})])
def test_karcher_matches_reference(n, settings, bf16):
    base, others = family(n=n, bf16=bf16, seed=n)
    others = [o * (1 + i) for i, o in enumerate(others)]   # different norms
    close(karcher(base, others, **settings), reference.karcher(base, others, **settings))


def test_karcher_of_two_points_is_the_normalised_sum_of_directions_times_mean_norm():
    _, (a, b) = family(seed=8, n=2)
    b = 3 * b
    na, nb = a.norm(), b.norm()
    direction = a / na + b / nb
    out = karcher(torch.zeros_like(a), [a, b])
    close(out, direction / direction.norm() * (na + nb) / 2)
    midpoint = slerp(a / na, [b / nb], t=0.5)                    # the same direction
    close(out / out.norm(), midpoint / midpoint.norm())


def test_karcher_of_one_input_returns_it_and_ignores_the_base():
    base, others = family(n=3, seed=9)
    assert torch.equal(karcher(base, others[:1]), others[0])
    assert torch.equal(karcher(base, others), karcher(torch.zeros_like(base), others))


def test_karcher_zero_norm_inputs_count_only_in_the_mean_norm():
    _, (a, b) = family(seed=10, n=2)
    zero = torch.zeros_like(a)
    pair = karcher(zero, [a, b])
    close(karcher(zero, [zero, a, b]), pair * 2 / 3)
    close(karcher(zero, [zero, a, b]), reference.karcher(zero, [zero, a, b]))
    assert torch.equal(karcher(zero, [zero, zero]), zero)


def test_karcher_of_nearly_parallel_inputs_keeps_float32_precision():
    """Fine-tunes of one base are nearly parallel (angles ~1e-4): float32 arccos of their
    cosines is off by ~1e-4 there; the angle from atan2 keeps the result within float32 noise."""
    base, _ = family(shape=(64, 48), seed=11)
    gen = torch.Generator().manual_seed(12)
    others = [base + 3e-4 * torch.randn(base.shape, generator=gen) for _ in range(3)]
    close(karcher(base, others), reference.karcher(base, others), rtol=1e-6, atol=1e-6)


SETTINGS = [(nuslerp, {"weights": [0.3, 0.9], "nuslerp_flatten": False}),
            (multislerp, {"weights": [0.3, 0.9, 0.5]}), (karcher, {})]
IDS = ["nuslerp", "multislerp", "karcher"]


@pytest.mark.parametrize("method, params", SETTINGS, ids=IDS)
def test_results_do_not_depend_on_memory_alignment(method, params):
    """No BLAS dot products (their rounding follows the alignment of the data): the views at odd
    offsets that a streamed merge may hand over give the bits of fresh copies."""
    base, _ = family(shape=(40, 30), seed=13)
    n = base.numel()
    store = torch.randn(3 * n + 3, generator=torch.Generator().manual_seed(14))
    views = [store[i * n + 1 + i: (i + 1) * n + 1 + i].view(base.shape)
             for i in range(len(params.get("weights", [0] * 3)))]
    copies = [v.clone() for v in views]
    assert torch.equal(method(base, views, **params), method(base, copies, **params))


@pytest.mark.parametrize("method, params", [
    (nuslerp, {"weights": [0.3, 0.9]}),
    (nuslerp, {"weights": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    (multislerp, {"weights": [0.5, 1.0, 0.7]}), (karcher, {"max_iter": 5})],
    ids=["nuslerp", "nuslerp-columns", "multislerp", "karcher"])
def test_sums_over_row_chunks_match_reference(monkeypatch, method, params):
    """Chunks of 3 rows (the last one shorter): the whole-tensor sums gathered chunk by chunk,
    as the two-pass form streams them, still give the float64 paper box."""
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 3 * 10)
    base, others = family(shape=(13, 10), n=len(params.get("weights", [0] * 3)), seed=15)
    others = [o * (1 + i) for i, o in enumerate(others)]   # different norms
    close(method(base, others, **params), getattr(reference, method.__name__)(base, others,
                                                                              **params))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method, params", SETTINGS, ids=IDS)
def test_cuda_matches_cpu(method, params):
    base, others = family(shape=(300, 70), n=len(params.get("weights", [0] * 3)))
    cpu = method(base, others, **params)
    gpu = method(base.cuda(), [o.cuda() for o in others], **params)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_defaults_are_mergekits():
    assert METHODS["nuslerp"].defaults == {"weights": 1.0, "nuslerp_row_wise": False,
                                           "nuslerp_flatten": True, "task_vectors": True}
    assert METHODS["multislerp"].defaults == {"weights": 1.0, "normalize_weights": True,
                                              "eps": 1e-8, "task_vectors": True}
    assert METHODS["karcher"].defaults == {"max_iter": 10, "tol": 1e-5}


# ----------------------------------------------------------------------------- end to end
# `models`: a base (fp32, sharded) and three fine-tunes, the second bf16
def dense(method, base, fts, dtype=torch.float32, **params) -> dict[str, torch.Tensor]:
    """The method's dense function over whole state dicts, cast to `dtype`."""
    b, others = load_weights(base), [load_weights(f) for f in fts]
    context = {"tensor_name": "t"} if "tensor_name" in METHODS[method].context else {}
    return {name: METHODS[method].fn(t0.float(), [o[name].float() for o in others], **params,
                                     **context).to(dtype) for name, t0 in b.items()}


def same(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method, flags, params", [
    ("nuslerp", ["--no-task_vectors", "--weights", "0.3,0.9"],
     {"weights": [0.3, 0.9], "task_vectors": False}),
    ("nuslerp", ["--weights", "0.3,0.9", "--nuslerp_row_wise", "--no-nuslerp_flatten"],
     {"weights": [0.3, 0.9], "nuslerp_row_wise": True, "nuslerp_flatten": False}),
    ("multislerp", ["--no-task_vectors", "--no-normalize_weights", "--weights", "0.2,0.5"],
     {"weights": [0.2, 0.5], "task_vectors": False, "normalize_weights": False}),
])
def test_cli_both_base_modes_and_their_recipe_round_trip(models, tmp_path, method, flags, params):
    """Without task vectors the output does not depend on --base_model, and the recipe has no
    base_model (mergekit's plain mode); --config on the recipe gives the same bits."""
    base, fts = models
    first, again = tmp_path / "first", tmp_path / "again"
    donor = fts[2] if not params.get("task_vectors", True) else base   # any config donor will do
    assert run("--method", method, "--base_model", donor, "--models_to_merge",
               f"{fts[1]},{fts[0]}", "--save_path", first, *flags) == 0   # bf16 first
    assert same(load_weights(first), dense(method, donor, [fts[1], fts[0]], **params))
    config = yaml.safe_load((first / "merge_recipe.yaml").read_text())
    assert ("base_model" in config) == params.get("task_vectors", True)
    assert "task_vectors" not in config["parameters"]
    assert run("--config", first / "merge_recipe.yaml", "--save_path", again) == 0
    assert same(load_weights(again), load_weights(first))


@pytest.mark.parametrize("method, with_base", [("nuslerp", False), ("nuslerp", True),
                                                ("multislerp", False)])
def test_yaml_base_model_decides_task_vectors(models, tmp_path, method, with_base):
    base, fts = models
    shared = "eps: 1e-6" if method == "multislerp" else "nuslerp_flatten: false"
    config = write(tmp_path, f"merge_method: {method}\n"
                             + (f"base_model: {base}\n" if with_base else "")
                             + f"models:\n  - model: {fts[1]}\n    parameters: {{weight: 0.4}}\n"
                             f"  - model: {fts[0]}\n    parameters: {{weight: 0.8}}\n"
                             f"parameters: {{{shared}}}\n")
    out = tmp_path / "out"
    assert run("--config", config, "--save_path", out) == 0
    extra = {"eps": 1e-6} if method == "multislerp" else {"nuslerp_flatten": False}
    donor_dtype = torch.float32 if with_base else torch.bfloat16   # the first model's (ft2)
    want = dense(method, base, [fts[1], fts[0]], donor_dtype, weights=[0.4, 0.8], task_vectors=with_base,
                 **extra)
    assert same(load_weights(out), want)
    record = yaml.safe_load((out / "merge_recipe.yaml").read_text())["merge"]
    assert record["base_model"] == str(base if with_base else fts[1])   # the config donor


def test_yaml_karcher_averages_a_base_model_in_with_a_warning(models, tmp_path, caplog):
    base, fts = models
    config = write(tmp_path, f"merge_method: karcher\nbase_model: {base}\nmodels:\n"
                             f"  - model: {fts[0]}\n  - model: {fts[1]}\nparameters: "
                             "{max_iter: 4, tol: 1e-6}\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert run("--config", config, "--save_path", out) == 0
    assert any("karcher averages the base_model" in r.getMessage() for r in caplog.records)
    assert same(load_weights(out), dense("karcher", base, [*fts[:2], base], max_iter=4, tol=1e-6))


@pytest.mark.parametrize("text, fragment", [
    ("merge_method: nuslerp\nmodels:\n  - model: {a}\n  - model: {b}\n",
     "missing required parameter 'weight'"),
    ("merge_method: multislerp\nbase_model: {base}\nmodels:\n  - model: {a}\n"
     "    parameters: {{weight: 1}}\n  - model: {b}\n", "missing required parameter 'weight'"),
    ("merge_method: nuslerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
     "  - model: {a}\nparameters: {{weight: 1}}\n",
     "merge_method nuslerp takes exactly 2 model(s) besides the base, got 1"),
    ("merge_method: nuslerp\nmodels:\n  - model: {a}\n  - model: {b}\n"
     "parameters: {{weight: 1, task_vectors: false}}\n", "unknown parameter 'task_vectors'"),
    ("merge_method: karcher\nmodels:\n  - model: {a}\nparameters: {{max_iter: 2.5}}\n",
     "--max_iter: expected a whole number, got 2.5"),
])
def test_yaml_refusals(models, tmp_path, capsys, text, fragment):
    base, (a, b, _) = models
    config = write(tmp_path, text.format(base=base, a=a, b=b))
    assert_user_error(capsys, run("--config", config, "--save_path", tmp_path / "o"), fragment)


@pytest.mark.parametrize("method, n, extra, fragment", [
    ("nuslerp", 3, [], "nuslerp takes exactly 2 model(s) besides --base_model, got 3"),
    ("multislerp", 2, ["--weights", "1,-1"],
     "--weights: the weights sum to 0, so a normalized average is undefined; change the "
     "weights or pass --no-normalize_weights"),
    ("multislerp", 2, ["--eps", "0"], "--eps: 0 is outside the allowed range (must be > 0)"),
    ("karcher", 2, ["--tol", "-1"], "--tol: -1 is outside the allowed range (must be >= 0)"),
    ("karcher", 2, ["--weights", "1,2"], "--weights does not apply to --method karcher"),
])
def test_cli_refusals(models, tmp_path, capsys, method, n, extra, fragment):
    base, fts = models
    code = run("--method", method, "--base_model", base, "--models_to_merge",
               ",".join(map(str, fts[:n])), "--save_path", tmp_path / "o", *extra)
    assert_user_error(capsys, code, fragment)


def test_whole_tensor_norms_stay_exact_on_a_large_tensor():
    """On 4M entries torch's float32 vector_norm is 8e-5 off: multislerp of two equal task
    vectors gives that vector back, and nuslerp of two models stays at the float64 reference,
    each to float32 rounding (measured with vector_norm: 1.6e-6 and 1.2e-5 relative)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1 << 22, generator=g)
    a, b = (base + torch.randn(1 << 22, generator=g).mul_(0.02).add_(0.01) for _ in range(2))

    def error(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.double() - want).norm() / (want - base.double()).norm())

    assert error(multislerp(base, [a, a], weights=[1.0, 1.0]), a.double()) < 2e-7
    want = reference.nuslerp(base, [a, b], weights=[1.0, 2.0])
    assert error(nuslerp(base, [a, b], weights=[1.0, 2.0]), want) < 3e-6
