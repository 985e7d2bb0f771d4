"""The paper box of every method: its formulas written out densely in float64.

Stacked task vectors, stable sorts and literal cosines, as ALGORITHMS.md §0-5 state them, with
no concern for memory or speed. Each function takes the method's own arguments and returns a
float64 tensor; each method's docstring points here, and the tests compare the dense and the
fast path of every method against these (they share no code with them).
"""
from __future__ import annotations

import hashlib
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
