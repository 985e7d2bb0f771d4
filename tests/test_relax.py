"""AIM relaxation math (ALGORITHMS.md §12.1) and the issue-6 controls, against float64 references."""
from __future__ import annotations

import itertools
import logging

import pytest
import torch

from aim.relax import importance, relax, relaxation_factors

# name -> (shape, input-feature axis): a Linear [out, in], a Conv1D [in, out], a norm [C]
WEIGHTS = {"lin.weight": ((5, 4), 1), "conv.weight": ((3, 6), 0), "norm.weight": ((7,), 0)}


def dense_factor(stat: torch.Tensor, omega: float) -> torch.Tensor:
    """r_c = 1 - a_c (1 - omega), a = |S| / max |S|, in float64."""
    a = stat.double().abs() / stat.double().abs().max()
    return 1 - a * (1 - omega)


def dense_relax(merged, base, r, axis):
    """Element by element: W[idx] = base[idx] + (merged[idx] - base[idx]) * r[idx[axis]]."""
    out = torch.empty(merged.shape, dtype=torch.float64)
    for idx in itertools.product(*(range(n) for n in merged.shape)):
        out[idx] = base[idx].double() + (merged[idx].double() - base[idx].double()) * r[idx[axis]]
    return out


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    stats, merged, base = {}, {}, {}
    for name, (shape, axis) in WEIGHTS.items():
        stats[name] = torch.rand(shape[axis], generator=g) * 10
        base[name] = torch.randn(shape, generator=g)
        merged[name] = base[name] + torch.randn(shape, generator=g)
    shapes = {n: s for n, (s, _) in WEIGHTS.items()}
    axes = {n: a for n, (_, a) in WEIGHTS.items()}
    return stats, shapes, axes, merged, base


@pytest.mark.parametrize("omega", [0.0, 0.4, 0.75])
def test_aim_matches_dense_float64_reference(case, omega):
    stats, shapes, axes, merged, base = case
    factors = relaxation_factors(stats, shapes, axes, omega)
    for name in WEIGHTS:
        expected = dense_relax(merged[name], base[name], dense_factor(stats[name], omega), axes[name])
        out = relax(merged[name], base[name], factors[name], axes[name])
        assert out.dtype == torch.float32 and out.shape == merged[name].shape
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["aim", "channel_blind", "uniform"])
def test_omega_one_returns_the_merged_weights(case, mode):
    stats, shapes, axes, merged, base = case
    factors = relaxation_factors(stats, shapes, axes, 1.0, mode=mode)
    for name in WEIGHTS:
        assert torch.equal(factors[name], torch.ones(shapes[name][axes[name]]))
        assert torch.equal(relax(merged[name], base[name], factors[name], axes[name]), merged[name])


def test_omega_zero_gives_the_base_on_the_most_important_channel(case):
    stats, shapes, axes, merged, base = case
    factors = relaxation_factors(stats, shapes, axes, 0.0)
    for name in WEIGHTS:
        out = relax(merged[name], base[name], factors[name], axes[name])
        top = int(stats[name].argmax())
        assert torch.equal(out.select(axes[name], top), base[name].select(axes[name], top))
        low = int(stats[name].argmin())
        kept = 1 - stats[name][low] / stats[name].max()  # share of the merged delta kept there
        torch.testing.assert_close(out.select(axes[name], low) - base[name].select(axes[name], low),
                                   kept * (merged[name] - base[name]).select(axes[name], low))


@pytest.mark.parametrize("omega", [0.0, 0.3])
def test_channel_blind_keeps_each_modules_mean_factor(case, omega):
    stats, shapes, axes, _, _ = case
    blind = relaxation_factors(stats, shapes, axes, omega, mode="channel_blind")
    for name in WEIGHTS:
        aim_mean = dense_factor(stats[name], omega).mean()
        assert torch.allclose(blind[name].double(), aim_mean.expand(shapes[name][axes[name]]), atol=1e-6)


@pytest.mark.parametrize("omega", [0.0, 0.3])
def test_uniform_is_the_element_weighted_mean_aim_factor(case, omega):
    stats, shapes, axes, merged, base = case
    uniform = relaxation_factors(stats, shapes, axes, omega, mode="uniform")
    # materialise every element's AIM factor and average them all
    every = [dense_relax(torch.ones(shapes[n]), torch.zeros(shapes[n]), dense_factor(stats[n], omega), axes[n])
             for n in WEIGHTS]
    expected = torch.cat([e.flatten() for e in every]).mean()
    for name in WEIGHTS:
        assert torch.allclose(uniform[name].double(), expected.expand(shapes[name][axes[name]]), atol=1e-6)
    # the uniform factor is not just the average over channels (columns of a big weight count more)
    channel_mean = torch.cat([dense_factor(stats[n], omega) for n in WEIGHTS]).mean()
    assert abs(float(channel_mean - expected)) > 1e-4


def test_zero_statistic_is_skipped_and_bad_input_raises(case, caplog):
    stats, shapes, axes, _, _ = case
    assert importance(torch.zeros(4)) is None
    torch.testing.assert_close(importance(torch.tensor([1.0, -4.0, 2.0])), torch.tensor([0.25, 1.0, 0.5]))
    factors = relaxation_factors({**stats, "lin.weight": torch.zeros(4)}, shapes, axes, 0.4)
    assert set(factors) == {"conv.weight", "norm.weight"}
    with pytest.raises(ValueError, match="unknown AIM mode"):
        relaxation_factors(stats, shapes, axes, 0.4, mode="blind")
    with pytest.raises(ValueError, match="lin.weight"):
        relaxation_factors({"lin.weight": torch.ones(5)}, shapes, axes, 0.4)
    with pytest.raises(ValueError, match="inf or NaN"):
        importance(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="differ in shape"):
        relax(torch.zeros(2, 3), torch.zeros(3, 2), torch.ones(3), 1)
    with caplog.at_level(logging.WARNING):
        relaxation_factors(stats, shapes, axes, 1.5)
    assert "outside [0, 1]" in caplog.text
