"""Multi-SLERP: a weighted mean of N models on the hypersphere (mergekit 0.1.5's own method, no
paper; ALGORITHMS.md §19.5).

With vi the flattened task vectors θi − θ0 (`task_vectors`, mergekit with a base_model; the base
is added back) or the models θi themselves, and wi the weights (divided by their sum when
`normalize_weights`, with no zero-sum guard in mergekit):

    ni = ‖vi‖,  ui = vi / (ni + eps),  m = Σ wi·ui
    out = (Σ wi·ni) · m / ‖m‖

mergekit projects the ui onto the tangent space at m̂ = m/‖m‖ and maps back; that tangent sum
is Σ wi (ui − (ui·m̂) m̂) = m − ‖m‖ m̂ = 0, so its result is the line above up to float rounding
(§19.5's identity, used here). One model is returned as it is. When ‖m‖ < eps (antipodal
inputs whose weights balance, or all-zero task vectors): two models give w1·v1 + w2·v2, more
are an error (as in mergekit).

Decision: float32 arithmetic (mergekit computes in the input dtype, bf16 in bf16 merges). It
needs whole tensors (norms): besides the inputs, the N task vectors (none without a base), the
mean and one product, float32 copies of the tensor each.
"""
from __future__ import annotations

import torch
from torch import Tensor

from checkpoints.errors import UserError
from merging_methods.primitives import vector_norm


def multislerp(base: Tensor, others: list[Tensor], *, weights: list[float],
               normalize_weights: bool = True, eps: float = 1e-8, task_vectors: bool = True,
               tensor_name: str = "") -> Tensor:
    """The weighted-mean direction of the unit (task) vectors scaled by their weighted mean norm
    (§19.5). Paper box: reference.multislerp."""
    if len(others) == 1:
        return others[0].clone()
    total = sum(weights)
    w = [x / total for x in weights] if normalize_weights else list(weights)
    vs = [o - base for o in others] if task_vectors else others
    norms = [vector_norm(v) for v in vs]
    mean = torch.zeros_like(base)
    for wi, v, n in zip(w, vs, norms):   # wi·ui rounded on its own (no fused multiply-add) and
        mean += v * (wi / float(n + eps))  # n + eps in float32, as mergekit: antipodes cancel
    norms = [float(n) for n in norms]
    mean_norm = float(vector_norm(mean))
    if mean_norm >= eps:
        out = mean.mul_(sum(wi * n for wi, n in zip(w, norms)) / mean_norm)
    elif len(vs) == 2:
        out = torch.mul(vs[0], w[0]).add_(vs[1], alpha=w[1])
    else:
        raise UserError(f"multislerp: tensor {tensor_name}: the weighted mean of the unit "
                        f"{'task ' if task_vectors else ''}vectors is zero (antipodal models "
                        "whose --weights balance out, or every model equal to the base); change "
                        "the weights or the models")
    return out.add_(base) if task_vectors else out
