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
    out = (Σ_all ni / N) · μ   (zero-norm inputs still count in the 1/N)

One input is returned as it is; two converge at once to the normalised u1 + u2 (the SLERP
midpoint of their directions). Decisions: float32 arithmetic, norms and dot products included
(mergekit takes the dot products in the input dtype, bf16 in bf16 merges); θi is computed as
atan2(‖ui − ci·μ‖, ci), which equals arccos ci but keeps its precision for the nearly parallel
inputs of fine-tunes of one base (float32 arccos cannot tell angles below ~2e-4 from 0, so the
tol skip would drop them at random); dot products are sums of products, not BLAS dots, whose
rounding depends on memory alignment (streamed and in-memory merges give the same bits). It
needs whole tensors (norms): μ, T and a scratch vector, three float32 copies besides the
inputs; the ui are never stored.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def karcher(base: Tensor, others: list[Tensor], *, max_iter: int = 10,
            tol: float = 1e-5) -> Tensor:
    """The Karcher mean of `others` on the unit sphere times their mean norm; `base` is not
    used (§19.6). Paper box: reference.karcher."""
    if len(others) == 1:
        return others[0].clone()
    xs = [o.reshape(-1) for o in others]
    norms = [float(torch.linalg.vector_norm(x)) for x in xs]
    valid = [(x, n) for x, n in zip(xs, norms) if n > tol]
    if not valid:
        return torch.zeros_like(base)
    alpha = 1.0 / len(valid)
    mu = torch.zeros_like(xs[0])
    for x, n in valid:
        mu.add_(x, alpha=alpha / n)
    length = float(torch.linalg.vector_norm(mu))
    mu = valid[0][0] / valid[0][1] if length < tol else mu.div_(length)
    scratch = torch.empty_like(mu)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mu)
        for x, n in valid:   # T += α θ/sin θ (x/n − c μ)
            c = min(max(float(torch.mul(mu, x, out=scratch).sum()) / n, -1.0), 1.0)
            away = torch.mul(mu, -c, out=scratch).add_(x, alpha=1.0 / n)   # length sin θ
            sin_theta = float(torch.linalg.vector_norm(away))
            theta = math.atan2(sin_theta, c)   # arccos c, without its float32 noise near c = 1
            if theta < tol or sin_theta == 0.0:
                continue
            tangent.add_(away, alpha=alpha * theta / sin_theta)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mu = mu.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        length = float(torch.linalg.vector_norm(mu))
        if length > tol:
            mu.div_(length)
    return mu.mul_(sum(norms) / len(norms)).reshape(base.shape)
