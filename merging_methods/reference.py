"""The paper box of every method: its formulas written out densely in float64.

Stacked task vectors, stable sorts and literal cosines, as ALGORITHMS.md §0-5 and §19.4-19.6
(nuslerp, multislerp, karcher: checked in tests/test_spherical_methods.py) state them, with
no concern for memory or speed. Each function takes the method's own arguments and returns a
float64 tensor; each method's docstring points here, and the tests compare the dense and the
fast path of every method against these (they share no code with them).
"""
from __future__ import annotations

import hashlib
import itertools
import math
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor

Sparsify = Callable[[int, Tensor], Tensor]  # (model index, float64 delta) -> sparsified delta


def keep_topk(x: Tensor, density: float, at_least_one: bool = False) -> Tensor:
    """Mask of exactly floor(density·n) largest |x| (`at_least_one`: max(1, ·), mergekit
    0.1.5, §19.3), by a stable sort: lower index wins ties."""
    flat = x.flatten()
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    k = math.floor(density * flat.numel())
    mask[order[: max(k, 1) if at_least_one else k]] = True
    return mask.view_as(x)


def l1_rescaled(sparse: Tensor, delta: Tensor) -> Tensor:
    """`sparse` scaled to the L1 norm of `delta` (unchanged when either norm is below 1e-7)."""
    full, kept = delta.abs().sum(), sparse.abs().sum()
    return sparse * (full / kept) if full >= 1e-7 and kept >= 1e-7 else sparse


def gta(base: Tensor, others: Sequence[Tensor], weights: Sequence[float], sparsify: Sparsify,
        consensus: bool, normalize: bool, scaling: float) -> Tensor:
    """§0.6 with the N task vectors stacked: sparsify, weight, (elect signs,) sum, scale."""
    b = base.double()
    u = [w * sparsify(i, o.double() - b) for i, (w, o) in enumerate(zip(weights, others))]
    if consensus:
        sign = torch.where(sum(u) >= 0, 1.0, -1.0).double()
        agree = [(torch.sign(x) == sign).double() for x in u]
        mixed = sum(a * x for a, x in zip(agree, u))
        div = sum(a * w for a, w in zip(agree, weights))
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed, div = sum(u), sum(weights)
        div = 1.0 if abs(div) < 1e-8 else div
    return b + scaling * (mixed / div if normalize else mixed)


def linear(base: Tensor, others: Sequence[Tensor], *, weights: Sequence[float],
           normalize: bool = True) -> Tensor:
    """§1: Σ wi·θi, divided by Σ wi when `normalize`; the base plays no part."""
    mixed = sum(w * o.double() for w, o in zip(weights, others))
    return mixed / sum(weights) if normalize else mixed


def task_arithmetic(base: Tensor, others: Sequence[Tensor], *, weights: Sequence[float],
                    scaling: float = 1.0, normalize: bool = False) -> Tensor:
    """§2: θ0 + λ·Σ wi·δi (/ Σ wi)."""
    return gta(base, others, weights, lambda i, d: d, False, normalize, scaling)


def ties(base: Tensor, others: Sequence[Tensor], *, weights: Sequence[float],
         density: Sequence[float], scaling: float = 1.0, normalize: bool = True,
         rescale: bool = False, mergekit_trim: bool = False) -> Tensor:
    """§3.2: top-k trim (optionally back to the L1 norm; `mergekit_trim`: at least one entry),
    sign election, disjoint mean."""
    def trim(i: int, delta: Tensor) -> Tensor:
        kept = delta * keep_topk(delta, density[i], mergekit_trim)
        return l1_rescaled(kept, delta) if rescale else kept
    return gta(base, others, weights, trim, True, normalize, scaling)


WORD = (1 << 64) - 1


def splitmix64(state: int, k: int) -> int:
    """Output k (0-based) of SplitMix64 seeded with `state`, in Python integers mod 2**64."""
    z = (state + (k + 1) * 0x9E3779B97F4A7C15) & WORD
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & WORD
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & WORD
    return z ^ (z >> 31)


def dare_mask(seed: int, index: int, name: str, density: float, n: int) -> tuple[Tensor, float]:
    """Mask rule 2 written out: (keep-mask of n flat entries, the density used t/65536).

    key = SHA-256(f"{seed}:{index}:{name}")[:8] big-endian; entry j keeps iff 16-bit lane j%4
    (low lane first) of SplitMix64 output j//4 is < t = floor(density·65536 + 0.5)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{index}:{name}".encode()).digest()[:8], "big")
    t = math.floor(density * 65536 + 0.5)
    words = [splitmix64(key, k) for k in range((n + 3) // 4)]
    keep = [(words[j // 4] >> (16 * (j % 4))) & 0xFFFF < t for j in range(n)]
    return torch.tensor(keep, dtype=torch.float64), t / 65536


def dare(base: Tensor, others: Sequence[Tensor], *, weights: Sequence[float],
         density: Sequence[float], seed: int, tensor_name: str, consensus: bool,
         scaling: float = 1.0, normalize: bool = False, rescale: bool = True,
         rescale_mode: str = "inverse_density") -> Tensor:
    """§4.2 with mask rule 2 (`dare_mask`): keep, rescale by 1/(density used) or L1, then §0.6
    (with sign consensus for dare_ties)."""
    def drop(i: int, delta: Tensor) -> Tensor:
        keep, p = dare_mask(seed, i, tensor_name, density[i], delta.numel())
        if p >= 1:
            return delta
        dropped = delta * keep.view_as(delta)
        if not rescale:
            return dropped
        return dropped / p if rescale_mode == "inverse_density" else l1_rescaled(dropped, delta)
    return gta(base, others, weights, drop, consensus, normalize, scaling)


dare_linear = partial(dare, consensus=False)
dare_ties = partial(dare, consensus=True)


def _widen_scores(values: list[Tensor], t: float, s: float) -> Tensor:
    """§5.2 steps 3-4: stable ascending ranks k/n, softmax over models, s where 2k > t(n − 1)."""
    n = values[0].numel()
    ranks = torch.stack([torch.argsort(torch.argsort(v, stable=True), stable=True)
                         for v in values]).double()
    scores = torch.softmax(ranks / n, 0)
    scores[2 * ranks > t * (n - 1)] = s
    return scores


def widen(base: Tensor, others: Sequence[Tensor], *, above_average_value_ratio: float = 1.0,
          score_calibration_value: float = 1.0, is_input_embedding: bool = False) -> Tensor:
    """§5.2 (matrices, per column; the input embedding per token) and §5.3 (1-D, per entry)."""
    t, s = above_average_value_ratio, score_calibration_value
    b, os_ = base.double(), [o.double() for o in others]
    if b.dim() <= 1:
        deltas = torch.stack([o.flatten() - b.flatten() for o in os_])
        sig = deltas.abs()
        score = torch.softmax(sig, 0)
        score[sig > t * sig.mean(1, keepdim=True)] = s
        return (b.flatten() + (score * deltas).sum(0)).view_as(b)
    w0 = b.reshape(b.shape[0], -1)
    ws = [o.reshape(b.shape[0], -1) for o in os_]
    if is_input_embedding:
        w0, ws = w0.T, [w.T for w in ws]

    def norms_dirs(w: Tensor) -> tuple[Tensor, Tensor]:
        m = w.norm(dim=0)
        return m, w / m.clamp(min=1e-12)

    m0, d0 = norms_dirs(w0)
    mags, dirs = [], []
    for w in ws:
        m, d = norms_dirs(w)
        mags.append((m - m0).abs())
        cos = (d * d0).sum(0) / (d.norm(dim=0) * d0.norm(dim=0)).clamp(min=1e-8)
        dirs.append(1 - cos)
    weight = (_widen_scores(mags, t, s) + _widen_scores(dirs, t, s)) / 2
    out = w0 + sum(wt * (w - w0) for wt, w in zip(weight, ws))
    out = out.T if is_input_embedding else out
    return out.reshape(b.shape)


def _slerp_pair(x: Tensor, y: Tensor, t: float) -> Tensor:
    """§19.4 on one vector pair: normalised copies for the cosine, lerp when 1 − c² ≤ 1e-16."""
    xu, yu = x / max(float(x.norm()), 1e-7), y / max(float(y.norm()), 1e-7)
    c = min(max(float(xu @ yu), -1.0), 1.0)
    if 1 - c * c <= 1e-16:
        return (1 - t) * x + t * y
    theta = math.acos(c)
    return (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)


def nuslerp(base: Tensor, others: Sequence[Tensor], *, weights: Sequence[float],
            nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True,
            task_vectors: bool = True) -> Tensor:
    """§19.4: t = w2/(w1 + w2) (0.5 for a zero sum); SLERP of the whole tensors, of each row
    (index [r, :]) or, row_wise, of each column (index [:, c]), one pair at a time."""
    b = base.double()
    x, y = (o.double() - b if task_vectors else o.double() for o in others)
    w1, w2 = weights
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    out = torch.empty_like(x)
    if nuslerp_flatten or x.dim() <= 1:
        out = _slerp_pair(x.flatten(), y.flatten(), t).view_as(x)
    elif nuslerp_row_wise:   # each slice along the first axis: x[:, j, ...]
        for rest in itertools.product(*map(range, x.shape[1:])):
            out[(slice(None), *rest)] = _slerp_pair(x[(slice(None), *rest)],
                                                    y[(slice(None), *rest)], t)
    else:   # each slice along the last axis: x[i, ..., :]
        for lead in itertools.product(*map(range, x.shape[:-1])):
            out[lead] = _slerp_pair(x[lead], y[lead], t)
    return b + out if task_vectors else out


def multislerp(base: Tensor, others: Sequence[Tensor], *, weights: Sequence[float],
               normalize_weights: bool = True, eps: float = 1e-8, task_vectors: bool = True,
               tensor_name: str = "") -> Tensor:
    """§19.5 literally: unit vectors, their weighted mean m̂, the tangent-space sum T at m̂ and
    the exponential map back, scaled by the weighted mean norm."""
    b = base.double()
    if len(others) == 1:
        return others[0].double()
    vs = [(o.double() - b if task_vectors else o.double()).flatten() for o in others]
    w = [x / sum(weights) for x in weights] if normalize_weights else list(weights)
    norms = [float(v.norm()) for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    m = sum(wi * u for wi, u in zip(w, units))
    if float(m.norm()) < eps:
        if len(vs) != 2:
            raise ValueError(f"{tensor_name}: the weighted sum of the unit vectors is zero")
        out = w[0] * vs[0] + w[1] * vs[1]
    else:
        mh = m / m.norm()
        tangent = sum(wi * (u - (u @ mh) * mh) for wi, u in zip(w, units))
        tau = float(tangent.norm()) + eps
        out = sum(wi * n for wi, n in zip(w, norms)) * (
            math.cos(tau) * mh + math.sin(tau) / tau * tangent)
    out = out.view(base.shape)
    return b + out if task_vectors else out


def karcher(base: Tensor, others: Sequence[Tensor], *, max_iter: int = 10,
            tol: float = 1e-5) -> Tensor:
    """§19.6 with the unit vectors stored: fixed-point iteration of the Riemannian mean on the
    sphere (equal weights over the non-zero inputs), scaled by the mean norm of all inputs."""
    if len(others) == 1:
        return others[0].double()
    xs = [o.double().flatten() for o in others]
    norms = [float(x.norm()) for x in xs]
    units = [x / n if n > 0 else torch.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [u for u, n in zip(units, norms) if n > tol]
    if not valid:
        return torch.zeros_like(base, dtype=torch.float64)
    a = 1 / len(valid)
    mu = sum(a * u for u in valid)
    mu = valid[0] if float(mu.norm()) < tol else mu / mu.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mu)
        for u in valid:
            c = min(max(float(mu @ u), -1.0), 1.0)
            theta = math.acos(c)
            if theta >= tol:
                tangent = tangent + a * theta / math.sin(theta) * (u - c * mu)
        step = float(tangent.norm())
        if step < tol:
            break
        mu = math.cos(step) * mu + math.sin(step) * tangent / step
        if float(mu.norm()) > tol:
            mu = mu / mu.norm()
    return (sum(norms) / len(norms) * mu).view(base.shape)


def _deltas(base: Tensor, others: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(θ0 flattened, the stacked flat deltas (N, n)), float64 from float32 differences (§0.3)."""
    b = base.double().flatten()
    return b, torch.stack([(o.float() - base.float()).double().flatten() for o in others])


def sce(base: Tensor, others: Sequence[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """§19.7: variance top-K select (stable sort), ω from mean squares, sum-elected signs."""
    b, d = _deltas(base, others)
    if select_topk < 1:
        var = ((d - d.mean(0)) ** 2).mean(0)
        k = math.floor(select_topk * int((var != 0).sum())) if select_topk > 0 else 0
        keep = torch.zeros(d.shape[1], dtype=torch.float64)
        keep[torch.sort(var, descending=True, stable=True).indices[:k]] = 1.0
        d = d * keep
    omega = (d ** 2).mean(1)
    omega = omega / omega.sum() if abs(omega.sum()) >= 1e-6 else torch.full_like(omega, 1 / len(d))
    s = torch.where(d.sum(0) >= 0, 1.0, -1.0).double()
    a = (torch.sign(d) == s).double()
    w = omega[:, None] * a
    return (b + (w * d).sum(0) / w.sum(0).clamp(min=1e-6)).view(base.shape)


def nearswap(base: Tensor, others: Sequence[Tensor], *, t: float) -> Tensor:
    """§19.8: w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1), w·θ1 + (1 − w)·θ0."""
    b, o = base.double(), others[0].double()
    w = (t / (b - o).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * o + (1 - w) * b


def arcee_fusion(base: Tensor, others: Sequence[Tensor], *,
                 arcee_fusion_sample: str = "exact", generators=None) -> Tensor:
    """§19.9 with exact quantiles (a sample of 10^6 only matters for larger tensors)."""
    b, o = base.double(), others[0].double()
    p, q = torch.softmax(o, -1) + 1e-8, torch.softmax(b, -1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    imp = (o.float() - base.float()).double().abs() * kl
    ordered = sorted(imp.flatten().tolist())
    m = len(ordered)
    q50, q25, q75 = (ordered[math.floor(phi * (m - 1))] for phi in (0.5, 0.25, 0.75))
    tau = q50 + 1.5 * (q75 - q25)
    return torch.where(imp >= tau, o, b)


def _ram_parts(base: Tensor, others: Sequence[Tensor], epsilon: float):
    """(θ0, active-masked deltas A⊙δ (N, n), count c (n,), unique U, shared S) of §19.10."""
    b, d = _deltas(base, others)
    active = (d.abs() > epsilon).double()
    c = active.sum(0)
    return b, active * d, active, c, (c == 1).double(), (c > 1).double()


def ram(base: Tensor, others: Sequence[Tensor], *, ram_epsilon: float = 1e-5) -> Tensor:
    """§19.10: θ0 + Σi Aij δij (U_j + S_j / c_j)."""
    b, ad, _, c, u, s = _ram_parts(base, others, ram_epsilon)
    return (b + (ad * (u + s / c.clamp(min=1))).sum(0)).view(base.shape)


def ramplus_tl(base: Tensor, others: Sequence[Tensor], *, ram_epsilon: float = 1e-5,
               ramplus_r: float = 0.1, ramplus_alpha: float = 0.2) -> Tensor:
    """§19.10: λi = 1 + r·clamp(sharedi / max(uniquei, ε), 0, α);
    θ0 + Σi Aij δij (λi U_j + S_j / c_j)."""
    b, ad, a, c, u, s = _ram_parts(base, others, ram_epsilon)
    rho = (a * s).sum(1) / (a * u).sum(1).clamp(min=ram_epsilon)
    lam = 1 + ramplus_r * rho.clamp(0, ramplus_alpha)
    return (b + (ad * (lam[:, None] * u + s / c.clamp(min=1))).sum(0)).view(base.shape)


def model_stock(base: Tensor, others: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """§8 per row (the last axis with filter_wise, else the whole tensor), pairs in a loop."""
    width = base.shape[-1] if filter_wise and base.dim() >= 2 else base.numel()
    b = base.double().reshape(-1, width)
    thetas = [o.double().reshape(-1, width) for o in others]
    n, out = len(others), torch.empty_like(b)
    for r in range(b.shape[0]):
        offsets = [t[r] - b[r] for t in thetas]
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                cos = offsets[i] @ offsets[j] / max(offsets[i].norm() * offsets[j].norm(), 1e-6)
                cosines.append(min(max(float(cos), -1.0), 1.0))
        c = sum(cosines) / len(cosines)
        t = 0.0 if abs(1 + (n - 1) * c) < 1e-6 else n * c / (1 + (n - 1) * c)
        out[r] = t * sum(th[r] for th in thetas) / n + (1 - t) * b[r]
    return out.view(base.shape)
