"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere,
scaled by their mean norm (Karcher 1977; as registered by mergekit 0.1.5, ALGORITHMS.md §19.6).

Every input counts equally, αi = 1/N; the base takes no part (merge.py averages
--models_to_merge only, like `linear`; a YAML config's base_model is averaged in as one more
input, as mergekit does). With xi the flattened tensors, ni = ‖xi‖, ui = xi/ni, and V the
inputs with ni > tol (none: zeros), each weighing 1/|V|:

    μ = normalised Σ_V ui / |V|  (the first valid ui when that mean is shorter than tol)
    repeat max_iter times:  T = Σ_V (θi / sin θi)(ui − ci·μ) / |V|, ci = clamp(μ·ui, −1, 1),
                            θi = arccos ci (terms with θi < tol skipped); stop when ‖T‖ < tol;
                            μ ← cos‖T‖·μ + sin‖T‖·T/‖T‖, renormalised when ‖μ‖ > tol
    out = (Σ_all ni / N) · μ   (zero-norm inputs still count in the 1/N scale)

One input is returned as it is; two converge at once to the normalised u1 + u2 (the SLERP
midpoint of their directions).

μ, T and every ui − ci·μ stay in the span of the ui, so the iteration runs on their |V|
coefficients: every dot product and norm above is a quadratic form in the Gram matrix
Gij = xi·xj. Decisions: the Gram matrix is summed in float64 (float32 products are exact
there) in fixed blocks of the tensor's row chunks (gram.py), so its bits do not depend on memory
alignment, threads or streaming; the iteration runs in float64 on the host; θi = atan2(sin θi,
ci) with sin θi = ‖ui − ci·μ‖ from the Gram form (float32 arccos cannot tell angles below ~2e-4
from 0, so the tol skip would drop the nearly parallel inputs of fine-tunes of one base at
random); the result is one float32 pass Σ_V (scale·ai/ni)·xi. Cost: N(N+1)/2 dot products and N
axpys over the tensor instead of about 4N passes per iteration. The results are not bit for bit
those of a float32 iteration: they are closer to the float64 paper box (measured on a 32000x2048
tensor: a float32 torch norm over all 65M entries is 0.6% short, and the earlier float32 form's
output was 8e-4 off in relative terms; this one agrees with float64 to ~1e-7).

Memory: it streams. A matrix above 2M entries (streamed.HOLD_ONE_CHUNK) gets its Gram matrix in
one pass over its row chunks, then the combination chunk by chunk (KARCHER_TWO_PASS); peak: a
few chunks.
"""
from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from merging_methods.gram import (Combination, apply_combination, combine, gram,
                                  in_memory_source)
from merging_methods.streamed import HOLD_ONE_CHUNK, RowSource, TwoPass


def norm_of(coef: np.ndarray, units: np.ndarray) -> float:
    """‖Σ coef_i ui‖ from the unit Gram matrix (rounding can make the form slightly negative)."""
    return math.sqrt(max(float(coef @ units @ coef), 0.0))


def karcher_coefficients(units: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """μ's coefficients over the valid ui, given their Gram matrix `units` (ui·uj)."""
    size = len(units)
    alpha = 1.0 / size
    mu = np.full(size, alpha)
    length = norm_of(mu, units)
    mu = np.eye(size)[0] if length < tol else mu / length
    for _ in range(max_iter):
        tangent = np.zeros(size)
        cosines = units @ mu  # μ·ui
        for i in range(size):   # T += α θ/sin θ (ui − c μ)
            c = min(max(float(cosines[i]), -1.0), 1.0)
            away = -c * mu
            away[i] += 1.0
            sin_theta = norm_of(away, units)
            theta = math.atan2(sin_theta, c)   # arccos c, without its noise near c = 1
            if theta < tol or sin_theta == 0.0:
                continue
            tangent += alpha * theta / sin_theta * away
        step = norm_of(tangent, units)
        if step < tol:
            break
        mu = math.cos(step) * mu + math.sin(step) / step * tangent
        length = norm_of(mu, units)
        if length > tol:
            mu = mu / length
    return mu


def coefficients(source: RowSource, *, max_iter: int = 10, tol: float = 1e-5,
                 **_) -> Combination:
    """The Karcher mean as Σ ki·xi over the source's inputs (its base is not used), from their
    Gram matrix; None for one input (returned as it is)."""
    if source.n_models == 1:
        return None
    products = gram(source, task_vectors=False)
    norms = np.sqrt(np.maximum(np.diag(products), 0.0))
    valid = [i for i, n in enumerate(norms) if n > tol]
    ks = [0.0] * len(norms)
    if valid:
        scaled = products[np.ix_(valid, valid)] / np.outer(norms[valid], norms[valid])
        mu = karcher_coefficients(scaled, max_iter, tol)
        scale = float(norms.sum()) / len(norms)
        for coef, i in zip(mu, valid):
            ks[i] = scale * float(coef) / float(norms[i])
    return ks, False


def karcher(base: Tensor, others: list[Tensor], *, max_iter: int = 10, tol: float = 1e-5,
            out: Tensor | None = None) -> Tensor:
    """The Karcher mean of `others` on the unit sphere times their mean norm; `base` is not
    used (§19.6). Inputs may be stored bf16/fp16 (read in float32 blocks); `out` is an optional
    float32 result buffer. Paper box: reference.karcher."""
    combination = coefficients(in_memory_source(base, others), max_iter=max_iter, tol=tol)
    return combine(combination, base, others, out)


# the Gram matrix from the chunks, then the combination chunk by chunk
# a matrix above one chunk goes in two passes, the 2048 x 2048 ones too: held whole, their
# float32 copies took peak RSS on the 542M family to 0.40-0.45 GiB; 0.38-0.44 at this bound, in
# about the same time (two sets of 5 interleaved runs: 3.23 and 3.19 s against 3.10 and 3.23)
KARCHER_TWO_PASS = TwoPass(coefficients, apply_combination, hold_elements=HOLD_ONE_CHUNK)
