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

So out = Σ ki·vi with ki = (Σ wj·nj)/‖m‖ · wi/(ni + eps): the ni and ‖m‖² = Σ ci·cj·(vi·vj)
(ci = wi/(ni + eps)) come from the float64 Gram matrix of the vi (gram.py), summed over the
tensor's row chunks. Decisions: float32 elementwise arithmetic (mergekit computes in the input
dtype, bf16 in bf16 merges); ni + eps and ci are rounded to float32 as mergekit's float32 form
rounds them, so exactly antipodal inputs give ‖m‖ = 0 exactly.

Memory: it streams. A matrix too large to hold whole gets its Gram matrix in one pass over its
row chunks, then the combination chunk by chunk (MULTISLERP_TWO_PASS); peak: a few chunks.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from checkpoints.errors import UserError
from merging_methods.gram import (Combination, apply_combination, combine, gram,
                                  in_memory_source)
from merging_methods.streamed import RowSource, TwoPass


def coefficients(source: RowSource, *, weights: list[float], normalize_weights: bool = True,
                 eps: float = 1e-8, task_vectors: bool = True, tensor_name: str = "",
                 **_) -> Combination:
    """Multi-SLERP as Σ ki·vi over the source's (task) vectors, from their Gram matrix; None
    for one model (returned as it is)."""
    if source.n_models == 1:
        return None
    total = sum(weights)
    w = [x / total for x in weights] if normalize_weights else list(weights)
    products = gram(source, task_vectors)
    norms = np.sqrt(np.maximum(np.diag(products), 0.0))
    shifted = torch.tensor(norms, dtype=torch.float32) + eps   # ni + eps in float32
    units = (torch.tensor(w, dtype=torch.float64) / shifted.double()).float().double().numpy()
    mean_norm = math.sqrt(max(float(units @ products @ units), 0.0))
    if mean_norm >= eps:
        scale = sum(wi * float(n) for wi, n in zip(w, norms)) / mean_norm
        return [scale * float(c) for c in units], task_vectors
    if source.n_models == 2:
        return w, task_vectors
    raise UserError(f"multislerp: tensor {tensor_name}: the weighted mean of the unit "
                    f"{'task ' if task_vectors else ''}vectors is zero (antipodal models "
                    "whose --weights balance out, or every model equal to the base); change "
                    "the weights or the models")


def multislerp(base: Tensor, others: list[Tensor], *, weights: list[float],
               normalize_weights: bool = True, eps: float = 1e-8, task_vectors: bool = True,
               tensor_name: str = "", out: Tensor | None = None) -> Tensor:
    """The weighted-mean direction of the unit (task) vectors scaled by their weighted mean norm
    (§19.5). Inputs may be stored bf16/fp16 (read in float32 blocks); `out` is an optional
    float32 result buffer. Paper box: reference.multislerp."""
    combination = coefficients(in_memory_source(base, others), weights=weights,
                               normalize_weights=normalize_weights, eps=eps,
                               task_vectors=task_vectors, tensor_name=tensor_name)
    return combine(combination, base, others, out)


# the Gram matrix from the chunks, then the combination chunk by chunk
MULTISLERP_TWO_PASS = TwoPass(coefficients, apply_combination)
