"""Arcee Fusion (mergekit's `arcee_fusion`, Arcee; ALGORITHMS.md §19.9).

Base θ0 and one other model θ1. Each entry's importance is its change weighted by how much
its row's distribution changes (KL divergence of the row softmaxes, over the last axis; a 1-D
tensor is one row):

    P = softmax(θ1) + 1e-8,  Q = softmax(θ0) + 1e-8,  κ = Σ P·log(P/Q)   (per row)
    I = |θ1 − θ0| ⊙ κ
    q(φ) = sorted(I)[floor(φ·(M − 1))],  τ = q(0.5) + 1.5·(q(0.75) − q(0.25))
    out = θ0 + [I ≥ τ] ⊙ (θ1 − θ0)       (entries below the threshold stay at the base)

The quantiles are exact, over all M entries (Decision, §19.9). `arcee_fusion_sample=mergekit`
reads them, as mergekit 0.1.5 does, from 10^6 entries drawn with replacement when the tensor
has more, here from the runner's seeded per-tensor generator; both agree on smaller tensors.
The quantiles are selected, not sorted (O(M): one numpy partition on CPU, torch.kthvalue
elsewhere; the same values as the sorted ones). κ, I and the output are computed in row
chunks of about ROW_CHUNK entries (the same bits: every step is per row or per entry), so
besides its inputs it holds the importance and the output, the selection's copy of the
importance, and chunk-sized temporaries.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

PROB_EPS = 1e-8  # added to both softmaxes before the log ratio
SAMPLE_SIZE = 1_000_000  # mergekit's quantile sample, drawn only from larger tensors
IQR_FACTOR = 1.5
ROW_CHUNK = 1 << 20  # entries per row chunk of the softmaxes and the output


def row_kl(base: Tensor, other: Tensor) -> Tensor:
    """KL(softmax(other) ‖ softmax(base)) of each slice along the last axis, both + 1e-8;
    shaped to broadcast over those slices.

    Summed as Σ P·log1p((P − Q)/Q) − (P − Q), equal to Σ P·log(P/Q) since ΣP = ΣQ: for close
    models the literal terms are first-order in P − Q and cancel in the sum, leaving float32
    rounding as large as the second-order KL itself; these terms are second-order each."""
    p = torch.softmax(other, dim=-1).add_(PROB_EPS)
    q = torch.softmax(base, dim=-1).add_(PROB_EPS)
    change = p - q
    terms = torch.div(change, q).log1p_().mul_(p).sub_(change)
    return terms.sum(dim=-1, keepdim=True)


def fusion_threshold(importance: Tensor, sample: str,
                     generator: torch.Generator | None) -> Tensor:
    """τ = median + 1.5·IQR of the importance (lower quantiles), over all entries ("exact") or
    over SAMPLE_SIZE entries drawn with replacement from larger tensors ("mergekit")."""
    flat = importance.reshape(-1)
    if sample == "mergekit" and flat.numel() > SAMPLE_SIZE:
        if generator is None:
            raise ValueError("arcee_fusion_sample=mergekit needs the model's generator")
        picks = torch.randint(flat.numel(), (SAMPLE_SIZE,), generator=generator,
                              device=generator.device)
        flat = flat[picks.to(flat.device)]
    low, median, high = sorted_entries(flat, [math.floor(phi * (flat.numel() - 1))
                                              for phi in (0.25, 0.5, 0.75)])
    return median + IQR_FACTOR * (high - low)


def sorted_entries(flat: Tensor, positions: list[int]) -> list[Tensor]:
    """sorted(flat)[p] for each position p, by selection (O(M), no sort), as 0-d tensors."""
    if flat.device.type == "cpu":
        picked = torch.from_numpy(np.partition(flat.numpy(), positions)[positions])
        return list(picked.unbind())
    return [torch.kthvalue(flat, p + 1).values for p in positions]


def row_chunks(x: Tensor) -> list[Tensor]:
    """Views of `x` as (rows, last axis) in chunks of about ROW_CHUNK entries (a 1-D or 0-d
    tensor is one row)."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    return list(rows.split(max(1, ROW_CHUNK // max(rows.shape[1], 1))))


def arcee_fusion(base: Tensor, others: list[Tensor], *, arcee_fusion_sample: str = "exact",
                 generators: list[torch.Generator] | None = None) -> Tensor:
    """θ0 plus the changes of `others[0]` whose KL-weighted importance reaches the median +
    1.5·IQR threshold (§19.9); float64 paper box: reference.arcee_fusion."""
    if len(others) != 1:
        raise ValueError(f"arcee_fusion merges the base with exactly 1 other model, got "
                         f"{len(others)}")
    if base.numel() == 0:
        return base.clone()
    chunks = list(zip(row_chunks(base), row_chunks(others[0])))
    importance = base.new_empty(base.shape)  # contiguous: written through row views
    for (b, o), imp in zip(chunks, row_chunks(importance)):
        torch.mul(torch.sub(o, b).abs_(), row_kl(b, o), out=imp)
    threshold = fusion_threshold(importance, arcee_fusion_sample,
                                 generators[0] if generators else None)
    out = base.new_empty(base.shape)
    for (b, o), imp, res in zip(chunks, row_chunks(importance), row_chunks(out)):
        torch.add(b, torch.sub(o, b).masked_fill_(imp < threshold, 0.0), out=res)
    return out
