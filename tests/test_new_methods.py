"""slerp, model_stock, breadcrumbs*, della*, fr_merging, free_merging and the passthrough plan
against float64 references written here from ALGORITHMS.md §6-11, §17 and §18.6.

The references are loop-level and independent of the code under test (Python sorts with an
explicit (|δ|, index) key, per-position sign elections, per-bin filter masks). Deltas are taken
in float32 as the methods do (§0.3), so magnitude ranks and their ties agree; everything after
that runs in float64. Inputs come in fp32 and rounded to bf16 (many ties in |δ|).
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from merging_methods import primitives, reference
from merging_methods.breadcrumbs import breadcrumbs, breadcrumbs_ties, keep_range
from merging_methods.della import della, della_linear, keep_probabilities
from checkpoints.errors import UserError
from merging_methods.fr_merging import fr_filter, fr_keep_mask, fr_merging
from merging_methods.free_merging import free_merging
from merging_methods import della as della_module, model_stock as model_stock_module
from merging_methods.model_stock import model_stock
from merging_methods.passthrough import (
    LayerSlice, Source, layout_update, passthrough_plan, scaled_copy, split_layer_name,
)
from merging_methods.primitives import Deltas, PresetDrop, abs_rank_band, l1_factors, mask_generator
from merging_methods.registry import get_method
from merging_methods.slerp import slerp

SEED, NAME = 11, "model.layers.2.mlp.down_proj.weight"


# ----------------------------------------------------------------------------- inputs
def family(shape=(12, 10), n=3, seed=0, bf16=False):
    """A base and n fine-tunes near it; with bf16, every value rounded to bfloat16."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    others = [base + 0.05 * torch.randn(shape, generator=gen) for _ in range(n)]
    if bf16:
        base, others = base.bfloat16().float(), [o.bfloat16().float() for o in others]
    return base, others


def generators(n, seed=SEED):
    return [mask_generator(seed, i, NAME) for i in range(n)]


@pytest.fixture(params=[primitives.CPU_BLOCK, 7], ids=["block=default", "block=7"])
def block(request, monkeypatch):
    """The real block size and tiny blocks (many block boundaries in the GTA pipeline)."""
    monkeypatch.setattr(primitives, "CPU_BLOCK", request.param)


def close(actual, expected):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- references
def ref_delta(base, other):
    return (other.float() - base.float()).double()


def ref_gta(base, sparse, weights, *, consensus, normalize, scaling):
    """§0.6 steps 3-7 one position at a time: ui = wi·δ̃i, elect, agree, divide, scale."""
    b = base.double().flatten()
    flat = [d.flatten().tolist() for d in sparse]
    out = b.clone()
    for j in range(b.numel()):
        u = [w * d[j] for w, d in zip(weights, flat)]
        if consensus:
            s = 1.0 if sum(u) >= 0 else -1.0
            agree = [x != 0 and math.copysign(1.0, x) == s for x in u]
            mixed = sum(x for x, a in zip(u, agree) if a)
            div = sum(w for w, a in zip(weights, agree) if a) or 1.0
        else:
            mixed, div = sum(u), sum(weights)
            div = 1.0 if abs(div) < 1e-8 else div
        out[j] = b[j] + scaling * (mixed / div if normalize else mixed)
    return out.view(base.shape)


def ref_l1(sparse, delta):
    full, kept = delta.abs().sum(), sparse.abs().sum()
    return sparse * (full / kept) if full >= 1e-7 and kept >= 1e-7 else sparse


def ascending(values):
    """Positions of `values` in stable ascending order of |v| (lower index first among ties)."""
    return sorted(range(len(values)), key=lambda k: (abs(values[k]), k))


def ref_breadcrumbs(delta, density, gamma):
    """§9: keep sorted positions n_bot … n − n_top − 1 of the stable ascending |δ|."""
    flat = delta.flatten().tolist()
    n = len(flat)
    target, n_top = math.floor(density * n), math.floor(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    keep = torch.zeros(n, dtype=torch.float64)
    for k in ascending(flat)[n_bot: n - n_top]:
        keep[k] = 1.0
    return delta * keep.view(delta.shape)


def ref_keep_probabilities(delta, p, eps):
    """§17.2 steps 3-6: rows along axis 1 (a 1-D δ is one row), rank r → q = r/(m−1)."""
    moved = delta.reshape(1, -1) if delta.dim() == 1 else delta.movedim(1, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    m = rows.shape[1]
    prob = torch.empty_like(rows, dtype=torch.float64)
    for r in range(rows.shape[0]):
        for rank, k in enumerate(ascending(rows[r].tolist())):
            q = rank / (m - 1) if m > 1 else 0.5
            prob[r, k] = (p - eps) + 2 * eps * q
    prob = prob.view(moved.shape)
    return prob.view(delta.shape) if delta.dim() == 1 else prob.movedim(-1, 1)


def ref_magprune(delta, p, eps, index, rescale=True, mode="l1"):
    if p >= 1:
        return delta
    prob = ref_keep_probabilities(delta, p, eps)
    keep = (torch.rand(delta.shape, generator=mask_generator(SEED, index, NAME)).double()
            < prob).double()
    if not rescale:
        return delta * keep
    return ref_l1(delta * keep, delta) if mode == "l1" else delta * keep / prob


def ref_fr_mask(h, w, ratio, faithful):
    """§10.2 bin by bin: d from the Nyquist point; faithful adds the r_lo ring twice."""
    r_hi, r_lo = ratio * min(h, w), min(h, w) // 10
    mask = torch.zeros(h, w, dtype=torch.float64)
    for u in range(h):
        for v in range(w):
            d = math.sqrt((u - h // 2) ** 2 + (v - w // 2) ** 2)
            if faithful:
                mask[u, v] = (d <= r_lo) + (r_lo <= d <= r_hi)
            else:
                mask[u, v] = d <= r_hi
    return mask


def ref_fr_filter(delta, ratio=0.9, faithful=False):
    if delta.dim() != 2:
        return delta
    spectrum = torch.fft.fft2(delta) * ref_fr_mask(*delta.shape, ratio, faithful)
    return torch.fft.ifft2(spectrum).real


def ref_slerp(a, b, t):
    """§6 in float64: normalised copies for the dot, lerp when |dot| > 0.9995."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    dot = float(((a / na if na > 1e-8 else a) * (b / nb if nb > 1e-8 else b)).sum())
    dot = min(max(dot, -1.0), 1.0)
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    omega = math.acos(dot)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


# ----------------------------------------------------------------------------- slerp
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.2])
def test_slerp_matches_reference(t, bf16):
    a, (b,) = family(n=1, bf16=bf16, seed=3)
    b = torch.randn(a.shape, generator=torch.Generator().manual_seed(4))  # far from colinear
    if bf16:
        b = b.bfloat16().float()
    close(slerp(a, [b], t=t), ref_slerp(a, b, t).view(a.shape))


def test_slerp_endpoints_are_exact():
    a, (b,) = family(n=1)
    assert torch.equal(slerp(a, [b], t=0.0), a) and torch.equal(slerp(a, [b], t=1.0), b)


@pytest.mark.parametrize("other", ["2a", "-a", "a + tiny"])
def test_slerp_colinear_inputs_fall_back_to_lerp(other):
    a, _ = family(n=1)
    b = {"2a": 2 * a, "-a": -a, "a + tiny": a + 1e-3 * torch.randn(a.shape)}[other]
    out = slerp(a, [b], t=0.3)
    assert torch.isfinite(out).all()
    close(out, 0.7 * a.double() + 0.3 * b.double())


@pytest.mark.parametrize("other", ["far", "2a", "-a"])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_fast_path_into_the_result_buffer_gives_the_dense_bits(other, t):
    """The runner's path (stored bf16 inputs, row chunks written into its result buffer) and the
    dense function on float32 copies, on both branches of the formula and at the endpoints."""
    a, _ = family(n=1, bf16=True, seed=5)
    far = torch.randn(a.shape, generator=torch.Generator().manual_seed(6))
    b = {"far": far, "2a": 2 * a, "-a": -a}[other].bfloat16()
    fast = get_method("slerp").fast.fn
    buffer = torch.full(a.shape, float("nan"))
    out = fast(a.bfloat16(), [b], t=t, out=buffer)
    assert out.data_ptr() == buffer.data_ptr()
    assert torch.equal(out, slerp(a.bfloat16().float(), [b.float()], t=t))


def test_slerp_by_hand_quarter_circle():
    out = slerp(torch.tensor([1.0, 0.0]), [torch.tensor([0.0, 1.0])], t=0.5)
    close(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)], dtype=torch.float64))


def test_slerp_takes_exactly_one_other_model():
    a, others = family(n=2)
    with pytest.raises(ValueError, match="exactly 1"):
        slerp(a, others, t=0.5)


# ----------------------------------------------------------------------------- model stock
@pytest.mark.parametrize("shape", [(12, 10), (30,), (2, 3, 4)])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_model_stock_matches_reference(shape, filter_wise, bf16):
    base, others = family(shape=shape, bf16=bf16)
    close(model_stock(base, others, filter_wise=filter_wise),
          reference.model_stock(base, others, filter_wise=filter_wise))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_in_small_pieces_matches_reference(monkeypatch, filter_wise):
    """Pieces of 7 elements (one row of 10 with filter_wise): still the reference; per-row dots
    (filter_wise) are whole rows, so the bits do not change."""
    base, others = family(shape=(12, 10), bf16=True)
    whole = model_stock(base, others, filter_wise=filter_wise)
    monkeypatch.setattr(model_stock_module, "PIECE", 7)
    pieces = model_stock(base, others, filter_wise=filter_wise)
    close(pieces, reference.model_stock(base, others, filter_wise=filter_wise))
    assert torch.equal(pieces, whole) or not filter_wise


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_of_identical_fine_tunes_is_that_fine_tune(filter_wise):
    base, (tuned,) = family(n=1)
    out = model_stock(base, [tuned.clone() for _ in range(3)], filter_wise=filter_wise)
    torch.testing.assert_close(out, tuned, rtol=1e-6, atol=1e-6)


def test_model_stock_opposite_task_vectors_give_the_base():
    """N = 2, c = −1: |1 + (N − 1)·c| = 0 < 1e-6, so t = 0 (§19.3)."""
    base, (tuned,) = family(n=1)
    out = model_stock(base, [tuned, 2 * base - tuned])
    torch.testing.assert_close(out, base)


def test_model_stock_by_hand():
    """Orthogonal task vectors: c = 0, t = 0, out = base; 60 degrees: c = ½, t = 2/3."""
    base = torch.zeros(2)
    assert torch.equal(model_stock(base, [torch.tensor([1.0, 0]), torch.tensor([0, 1.0])]), base)
    out = model_stock(base, [torch.tensor([1.0, 0]), torch.tensor([0.5, math.sqrt(0.75)])])
    close(out, 2 / 3 * torch.tensor([0.75, math.sqrt(0.75) / 2], dtype=torch.float64))


def test_model_stock_needs_two_fine_tunes():
    base, others = family(n=1)
    with pytest.raises(ValueError, match="at least 2"):
        model_stock(base, others)


# ----------------------------------------------------------------------------- breadcrumbs
BREADCRUMBS = {"weights": [1.0, 0.5, -0.75], "density": [0.5, 0.8, 1.0],
               "gamma": [0.1, 0.0, 0.01]}


@pytest.mark.parametrize("method, consensus", [(breadcrumbs, False), (breadcrumbs_ties, True)])
@pytest.mark.parametrize("normalize, rescale", [(False, False), (True, True)])
@pytest.mark.parametrize("bf16", [False, True])
def test_breadcrumbs_matches_reference(method, consensus, normalize, rescale, bf16, block):
    base, others = family(bf16=bf16)
    p = BREADCRUMBS
    out = method(base, others, **p, scaling=0.9, normalize=normalize, rescale=rescale)
    sparse = []
    for i, other in enumerate(others):
        delta = ref_delta(base, other)
        kept = ref_breadcrumbs(delta, p["density"][i], p["gamma"][i])
        sparse.append(ref_l1(kept, delta) if rescale else kept)
    close(out, ref_gta(base, sparse, p["weights"], consensus=consensus, normalize=normalize,
                       scaling=0.9))


@pytest.mark.parametrize("n, density, gamma", [
    (120, 0.5, 0.1), (120, 0.9, 0.2), (120, 0.3, 0.0), (50, 0.4, 0.01), (120, 1.0, 0.05)])
def test_breadcrumbs_keeps_exactly_the_counted_entries(n, density, gamma, block):
    """⌊p·n⌋ entries survive, the ⌊γ·n⌋ largest (clipped) do not; γ·n < 1 keeps ⌊p·n⌋ too."""
    base, (tuned,) = family(shape=(n,), n=1)
    delta = tuned - base
    out = breadcrumbs(base, [tuned], weights=[1.0], density=[density], gamma=[gamma]) - base
    kept = out != 0
    assert int(kept.sum()) == math.floor(density * n)
    start, stop = keep_range(n, density, gamma)
    order = torch.sort(delta.abs(), stable=True).indices
    assert not kept[order[stop:]].any() and not kept[order[:start]].any()


def test_breadcrumbs_keep_range_by_hand():
    """§9: n = 100, p = 0.9, γ = 0.2 gives n_bot = −10 → n_top = 10, n_bot = 0."""
    assert keep_range(100, 0.5, 0.1) == (40, 90)
    assert keep_range(100, 0.9, 0.2) == (0, 90)
    assert keep_range(100, 0.5, 0.0) == (50, 100)  # the snapshot's slice would keep nothing
    assert keep_range(10, 1.0, 0.01) == (0, 10)


def test_abs_rank_band_ties_follow_the_stable_ascending_order(block):
    x = torch.tensor([2.0, -1.0, 1.0, 0.0, 1.0, -2.0, 1.0, 3.0])
    # stable ascending |x|: 3 | 1 2 4 6 | 0 5 | 7  (positions 0 … 7)
    assert abs_rank_band(x, 2, 6).tolist() == [True, False, True, False, True, False, True,
                                               False]
    assert abs_rank_band(x, 0, 8).all() and not abs_rank_band(x, 3, 3).any()


# ----------------------------------------------------------------------------- della
DELLA = {"weights": [1.0, 0.5, 0.75], "density": [0.4, 0.7, 1.0], "epsilon": [0.1, 0.2, 0.15]}


@pytest.mark.parametrize("method, consensus, normalize",
                         [(della, True, True), (della_linear, False, False)])
@pytest.mark.parametrize("rescale, mode", [(True, "l1"), (False, "l1"), (True, "inverse_prob")])
@pytest.mark.parametrize("shape, bf16", [((12, 10), False), ((12, 10), True), ((40,), True),
                                         ((2, 3, 4), False)])
def test_della_matches_reference(method, consensus, normalize, rescale, mode, shape, bf16,
                                 block):
    base, others = family(shape=shape, bf16=bf16)
    p = DELLA
    out = method(base, others, **p, scaling=1.1, rescale=rescale, rescale_mode=mode,
                 generators=generators(3))
    sparse = [ref_magprune(ref_delta(base, o), p["density"][i], p["epsilon"][i], i, rescale,
                           mode) for i, o in enumerate(others)]
    close(out, ref_gta(base, sparse, p["weights"], consensus=consensus, normalize=normalize,
                       scaling=1.1))


@pytest.mark.parametrize("shape", [(12, 10), (2, 3, 4)])
def test_della_drawn_one_row_at_a_time_matches_reference(monkeypatch, shape):
    """Masks drawn by groups of one axis-0 row (della.DRAW_ELEMENTS): the whole draw's bits."""
    monkeypatch.setattr(della_module, "DRAW_ELEMENTS", 7)
    test_della_matches_reference(della, True, True, True, "inverse_prob", shape, False, None)


def test_della_keep_probabilities_by_hand():
    """§17.2 worked example, and a row of equal magnitudes under the stable rule."""
    delta = torch.tensor([0.3, -0.1, 0.2, -0.4, 0.0])
    close(keep_probabilities(delta, 0.5, 0.1),
          torch.tensor([0.55, 0.45, 0.50, 0.60, 0.40], dtype=torch.float64))
    close(keep_probabilities(torch.tensor([1.0, 1, 1, 1, 2]), 0.5, 0.1),
          torch.tensor([0.40, 0.45, 0.50, 0.55, 0.60], dtype=torch.float64))
    assert keep_probabilities(torch.tensor([[3.0], [4.0]]), 0.5, 0.1).tolist() == [[0.5], [0.5]]


def test_della_l1_rescale_by_hand():
    """§17.2: mask [1, 0, 1, 1, 0] keeps L1 0.9 of 1.0, so the survivors grow by 10/9."""
    delta = torch.tensor([0.3, -0.1, 0.2, -0.4, 0.0])
    deltas = Deltas(torch.zeros(5), delta, 8)
    drop = PresetDrop(torch.tensor([True, False, True, True, False]))
    (factor,) = l1_factors([deltas], [drop])
    assert factor == pytest.approx(10 / 9)
    close(drop.apply_(deltas.block(0, 5), 0) * factor,
          torch.tensor([1 / 3, 0, 2 / 9, -4 / 9, 0], dtype=torch.float64))


def test_della_kept_fraction_and_rescale_in_distribution():
    """Mean keep rate p per row; larger |δ| kept more often (p ± ε at the ends); L1 kept."""
    base = torch.zeros(200, 500)
    tuned = torch.randn(base.shape, generator=torch.Generator().manual_seed(5))
    p, eps = 0.4, 0.1
    out = della_linear(base, [tuned], weights=[1.0], density=[p], epsilon=[eps],
                       generators=generators(1))
    kept = out != 0
    assert float(kept.float().mean()) == pytest.approx(p, abs=0.005)
    ranks = tuned.abs().argsort(1).argsort(1)  # 0 … 499 per row
    assert float(kept[ranks < 50].float().mean()) == pytest.approx(p - 0.9 * eps, abs=0.015)
    assert float(kept[ranks >= 450].float().mean()) == pytest.approx(p + 0.9 * eps, abs=0.015)
    torch.testing.assert_close(out.abs().sum(), tuned.abs().sum())
    factor = float((out[kept] / tuned[kept]).mean())  # one tensor-wide factor, below 1/p
    torch.testing.assert_close(out[kept], tuned[kept] * factor)
    assert 1 < factor < 1 / p


def test_della_same_seed_same_bits_new_seed_new_mask():
    base, others = family()
    run = lambda seed: della(base, others, **DELLA, generators=generators(3, seed))  # noqa: E731
    assert torch.equal(run(SEED), run(SEED)) and not torch.equal(run(SEED), run(SEED + 1))


def test_della_density_edges():
    """p ≥ 1: δ unchanged (ε unchecked); p ≤ 0: δ dropped; a window outside (0, 1): error."""
    base, (tuned,) = family(n=1)
    kw = {"weights": [1.0], "generators": generators(1)}
    assert torch.equal(della_linear(base, [tuned], density=[1.0], epsilon=[0.5], **kw),
                       base + (tuned - base))
    assert torch.equal(della_linear(base, [tuned], density=[0.0], epsilon=[0.5], **kw), base)
    with pytest.raises(UserError, match="epsilon"):
        della_linear(base, [tuned], density=[0.85], epsilon=[0.15], **kw)  # 0.85 + 0.15 == 1
    della_linear(base, [tuned], density=[0.84], epsilon=[0.15], **kw)
    with pytest.raises(ValueError, match="generator"):
        della_linear(base, [tuned], weights=[1.0], density=[0.5], epsilon=[0.1])


# ----------------------------------------------------------------------------- FR / FREE
@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (9, 7), (30,), (2, 3, 4)])
@pytest.mark.parametrize("ratio, faithful", [(0.9, False), (0.9, True), (0.5, True),
                                             (0.05, True)])
def test_fr_filter_matches_reference(shape, ratio, faithful):
    base, (tuned,) = family(shape=shape, n=1, seed=2)
    delta = tuned - base
    expected = ref_fr_filter(delta.double(), ratio, faithful)
    actual = fr_filter(delta, ratio, faithful) if delta.dim() == 2 else delta
    close(actual, expected)
    if delta.dim() == 2:
        assert torch.equal(fr_keep_mask(*shape, ratio, faithful).double(),
                           ref_fr_mask(*shape, ratio, faithful))


@pytest.mark.parametrize("n", [10, 64, 101])
def test_fr_filter_keeps_everything_on_a_square_matrix(n):
    assert bool(fr_keep_mask(n, n).eq(1).all())
    delta = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(fr_filter(delta), delta, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape, share", [((100, 270), 0.37), ((270, 100), 0.37),
                                          ((64, 400), 0.73)])
def test_fr_filter_removes_the_expected_share_of_bins(shape, share):
    """1:2.7 (5120×13824 MLP weights) removes ~37% of bins, 1:6.25 (embeddings) ~73% (§10.2);
    the removed bins are exactly zero in the filtered spectrum, the kept ones unchanged."""
    removed = ref_fr_mask(*shape, 0.9, False) == 0
    assert float(removed.double().mean()) == pytest.approx(share, abs=0.005)
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spectrum, filtered = torch.fft.fft2(delta), torch.fft.fft2(fr_filter(delta.float()).double())
    assert float(filtered[removed].abs().max()) < 1e-3
    torch.testing.assert_close(filtered[~removed], spectrum[~removed], rtol=0, atol=1e-3)


def test_fr_faithful_ring_by_hand():
    """min(H, W) < 10: r_lo = 0 doubles the Nyquist bin; 20×20: r_lo = 2 doubles 4 bins."""
    small = fr_keep_mask(9, 9, faithful=True)
    assert small[4, 4] == 2 and int((small == 2).sum()) == 1 and int((small == 1).sum()) == 80
    ring = torch.nonzero(fr_keep_mask(20, 20, faithful=True) == 2).tolist()
    assert sorted(ring) == [[8, 10], [10, 8], [10, 12], [12, 10]]


@pytest.mark.parametrize("shape", [(12, 20), (30,)])
@pytest.mark.parametrize("faithful, normalize", [(False, False), (True, True)])
@pytest.mark.parametrize("bf16", [False, True])
def test_fr_merging_matches_reference(shape, faithful, normalize, bf16, block):
    base, others = family(shape=shape, bf16=bf16)
    weights = [0.8, 0.8, 0.5]
    out = fr_merging(base, others, weights=weights, scaling=1.1, normalize=normalize,
                     fr_ratio=0.5, fr_faithful=faithful)
    sparse = [ref_fr_filter(ref_delta(base, o), 0.5, faithful) for o in others]
    close(out, ref_gta(base, sparse, weights, consensus=True, normalize=normalize, scaling=1.1))


@pytest.mark.parametrize("task_model", [0, 2])
@pytest.mark.parametrize("bf16", [False, True])
def test_free_merging_matches_reference(task_model, bf16, block):
    base, others = family(shape=(12, 20), bf16=bf16)
    weights = [0.8, 0.8, 0.8]
    out = free_merging(base, others, weights=weights, task_model=task_model,
                       expert_density=0.05, scaling=1.1, fr_ratio=0.5)
    sparse = [ref_fr_filter(ref_delta(base, o), 0.5) for o in others]
    backbone = ref_gta(base, sparse, weights, consensus=True, normalize=False, scaling=1.1)
    delta = ref_delta(base, others[task_model]).flatten()
    expert = torch.zeros_like(delta)  # E_t: the ⌊0.05·240⌋ = 12 largest |δ_t|, lower index first
    for k in sorted(range(delta.numel()), key=lambda k: (-abs(float(delta[k])), k))[:12]:
        expert[k] = delta[k]
    close(out, backbone + expert.view(base.shape))


def test_free_expert_is_empty_on_a_tensor_too_small_for_one_entry():
    """⌊0.01·30⌋ = 0: FREE equals FR-Merging there, no error."""
    base, others = family(shape=(30,))
    fr = fr_merging(base, others, weights=[1.0] * 3)
    assert torch.equal(free_merging(base, others, weights=[1.0] * 3, task_model=1), fr)
    with pytest.raises(ValueError, match="task_model"):
        free_merging(base, others, weights=[1.0] * 3, task_model=3)


# ----------------------------------------------------------------------------- passthrough
def llama_names(layers):
    per_layer = ["self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight"]
    return (["lm_head.weight", "model.embed_tokens.weight"]
            + [f"model.layers.{i}.{k}" for i in range(layers) for k in per_layer]
            + ["model.norm.weight"])


def test_passthrough_plan_renumbers_layers():
    """§18.10 C scaled down: layers [0, 3) of model 0, then [2, 6) of model 1 with scale 0.5
    on o_proj/down_proj (filters see the source names), 1.0 elsewhere; 7 layers out."""
    calls = []

    def scale(s, name, x):
        calls.append((s, name, x))
        if s == 0:
            return None
        return 0.5 if "o_proj" in name or "down_proj" in name else 1.0

    plan = passthrough_plan([LayerSlice(0, 0, 3), LayerSlice(1, 2, 6)],
                            [llama_names(4), llama_names(6)], [4, 6], scale)
    assert plan.num_hidden_layers == 7
    assert list(plan.sources)[0] == "model.embed_tokens.weight"
    assert list(plan.sources)[-2:] == ["lm_head.weight", "model.norm.weight"]
    assert set(plan.sources) == set(llama_names(7))
    src = plan.sources
    assert src["model.embed_tokens.weight"] == Source(0, "model.embed_tokens.weight", None)
    assert src["model.layers.2.mlp.down_proj.weight"] == Source(
        0, "model.layers.2.mlp.down_proj.weight", None)
    assert src["model.layers.3.self_attn.q_proj.weight"] == Source(
        1, "model.layers.2.self_attn.q_proj.weight", 1.0)
    assert src["model.layers.3.self_attn.o_proj.weight"] == Source(
        1, "model.layers.2.self_attn.o_proj.weight", 0.5)
    assert src["model.layers.6.mlp.down_proj.weight"] == Source(
        1, "model.layers.5.mlp.down_proj.weight", 0.5)
    assert src["lm_head.weight"] == Source(1, "lm_head.weight", 1.0)
    assert src["model.norm.weight"] == Source(1, "model.norm.weight", 1.0)
    positions = {(s, name): x for s, name, x in calls}  # §18.4: x restarts in every slice
    assert positions[(0, "model.embed_tokens.weight")] == 0.0
    assert positions[(0, "model.layers.1.mlp.down_proj.weight")] == 0.5
    assert positions[(1, "model.layers.2.mlp.down_proj.weight")] == 0.0
    assert positions[(1, "model.layers.4.mlp.down_proj.weight")] == pytest.approx(2 / 3)
    assert positions[(1, "model.norm.weight")] == 0.0


def test_passthrough_plan_one_layer_slices_and_repeats():
    """A layer may be used twice; a one-layer slice sits at x = 1; no scale gives None."""
    plan = passthrough_plan([LayerSlice(0, 1, 2), LayerSlice(0, 0, 2)], [llama_names(2)], [2])
    assert plan.num_hidden_layers == 3
    assert plan.sources["model.layers.0.input_layernorm.weight"].name == \
        "model.layers.1.input_layernorm.weight"
    assert plan.sources["model.layers.2.input_layernorm.weight"].name == \
        "model.layers.1.input_layernorm.weight"
    assert all(s.scale is None for s in plan.sources.values())


def test_layout_update_takes_each_layer_type_from_its_slice():
    """config.json of stacked slices: the depth, and layer_types only where the donor has them."""
    configs = [{"layer_types": ["a0", "a1", "a2"]}, {"layer_types": ["b0", "b1"]}]
    slices = [LayerSlice(0, 1, 3), LayerSlice(1, 0, 1)]
    assert layout_update(configs[0], configs, slices) == {
        "num_hidden_layers": 3, "layer_types": ["a1", "a2", "b0"]}
    assert layout_update({}, configs, slices) == {"num_hidden_layers": 3}


@pytest.mark.parametrize("start, end", [(2, 2), (3, 1), (-1, 2), (0, 5)])
def test_passthrough_plan_rejects_bad_layer_ranges(start, end):
    with pytest.raises(UserError, match=r"slices\[1\]: layer_range"):
        passthrough_plan([LayerSlice(0, 0, 2), LayerSlice(0, start, end)], [llama_names(4)], [4])
    with pytest.raises(UserError, match="at least one slice"):
        passthrough_plan([], [llama_names(4)], [4])


def test_split_layer_name_and_scaled_copy():
    assert split_layer_name("model.layers.12.mlp.up_proj.weight") == (
        "model.layers.", 12, ".mlp.up_proj.weight")
    assert split_layer_name("transformer.h.3.attn.c_attn.weight") == ("transformer.h.", 3,
                                                                      ".attn.c_attn.weight")
    assert split_layer_name("model.norm.weight") is None
    x = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert scaled_copy(x, None) is x
    assert torch.equal(scaled_copy(x, 0.5), torch.tensor([0.5, -1.0]))


# ----------------------------------------------------------------------------- all methods
def call(method, base, others):
    n = len(others)
    kw = {
        slerp: {"t": 0.4}, model_stock: {},
        breadcrumbs: {"weights": [1.0] * n, "density": [0.5] * n, "gamma": [0.1] * n},
        della: {"weights": [1.0] * n, "density": [0.5] * n, "epsilon": [0.1] * n,
                "generators": generators(n)},
        fr_merging: {"weights": [0.8] * n},
        free_merging: {"weights": [0.8] * n, "task_model": 0, "expert_density": 0.1},
    }
    kw[breadcrumbs_ties], kw[della_linear] = kw[breadcrumbs], kw[della]
    return method(base, others, **kw[method])


METHODS = [slerp, model_stock, breadcrumbs, breadcrumbs_ties, della, della_linear, fr_merging,
           free_merging]
IDS = ["slerp", "model_stock", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
       "fr_merging", "free_merging"]


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_base_merged_with_copies_of_itself_is_the_base(method):
    base, _ = family()
    n = 1 if method is slerp else 3
    out = call(method, base, [base.clone() for _ in range(n)])
    assert out.dtype == torch.float32 and out.shape == base.shape and torch.equal(out, base)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_signatures_follow_the_contract(method):
    """(base, others, *, keyword-only params); only della* declare a context kwarg."""
    params = list(inspect.signature(method).parameters.values())
    assert [p.name for p in params[:2]] == ["base", "others"]
    assert all(p.kind is p.KEYWORD_ONLY for p in params[2:])
    context = {"tensor_name", "layer_index", "num_layers", "is_input_embedding", "generators"}
    declared = {p.name for p in params} & context
    assert declared == ({"generators"} if method in (della, della_linear) else set())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_cuda_matches_cpu(method):
    base, others = family(shape=(300, 70))
    others = others[:1] if method is slerp else others
    cpu = call(method, base, others)
    gpu = call(method, base.cuda(), [o.cuda() for o in others])
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_l1_factors_of_several_models_in_one_pass():
    """Each model's ratio ‖δ‖₁ / ‖sparse(δ)‖₁ by hand, found in one lockstep pass; a model whose
    kept norm is 0 keeps factor 1."""
    base = torch.zeros(5)
    first = Deltas(base, torch.tensor([0.3, -0.1, 0.2, -0.4, 0.0]), 2)
    second = Deltas(base, torch.tensor([1.0, -1.0, 2.0, 0.0, 4.0]), 2)
    third = Deltas(base, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]), 2)
    drops = [PresetDrop(torch.tensor(m)) for m in
             ([True, False, True, True, False], [False, True, False, True, True],
              [False, False, True, True, True])]
    factors = l1_factors([first, second, third], drops)
    assert factors == [pytest.approx(1.0 / 0.9), pytest.approx(8.0 / 5.0), 1.0]
