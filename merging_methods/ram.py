"""RAM and RAM+ tensor-local (arXiv 2601.13572; mergekit's `ram`, `ramplus_tl`, ALGORITHMS.md
§19.10).

Per tensor, with δi = θi − θ0: entry j of model i is active when |δij| > epsilon; c_j counts
the active models there. Inactive deltas are dropped (even where other models are active):

    ram:        out_j = θ0j + Σi active δij / c_j            (θ0j where c_j = 0)
    ramplus_tl: entries with c_j = 1 (unique) are boosted by their model's λi, entries with
                c_j > 1 (shared) averaged as in ram:
                ρi = #(i active, c > 1) / max(#(i active, c = 1), epsilon)
                λi = 1 + r·clamp(ρi, 0, alpha)
                out_j = θ0j + Σi active λi·δij   where c_j = 1

ram is per element (the runner merges it in row chunks, blockwise.py); ramplus_tl's ρi counts
over the whole tensor, so it takes two blocked passes (`block_size` entries): the integer
counts, then the output. Memory: it streams. A matrix above rows.TWO_PASS_ELEMENTS is merged by
its two-pass form (streamed.py: the counts from the row chunks, then the chunks one by one),
which is also its whole-tensor function (over the held chunks) and its fast path (the same on
stored bf16/fp16 inputs, into the runner's result buffer): block-sized temporaries beside the
inputs and output; the counts are exact and the rest is per entry, so every entry has the
bits of the dense formula whatever the chunks.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from merging_methods.gta_blocked import output_buffer
from merging_methods.primitives import block_size, blocks
from merging_methods.streamed import RowSource, TwoPass, merge_held


def active_deltas(base: Tensor, others: list[Tensor], epsilon: float
                  ) -> tuple[list[Tensor], Tensor]:
    """(each δi with its inactive entries, |δ| <= epsilon, set to 0; the count c of active
    models per entry, float32). epsilon >= 0, so an entry is active iff it stays non-zero."""
    kept = []
    for other in others:
        delta = other - base
        kept.append(delta.masked_fill_(delta.abs() <= epsilon, 0.0))
    count = torch.zeros_like(base)
    for delta in kept:
        count += delta != 0
    return kept, count


def ram(base: Tensor, others: list[Tensor], *, ram_epsilon: float = 1e-5) -> Tensor:
    """θ0 + the mean of the active deltas at each entry (§19.10); float64 paper box:
    reference.ram."""
    kept, count = active_deltas(base, others, ram_epsilon)
    return base + sum(kept) / count.clamp_(min=1.0)


def flat_blocks(base: Tensor, others: list[Tensor]
                ) -> Iterator[tuple[int, int, Tensor, list[Tensor]]]:
    """(start, stop, base block, the others' blocks) over the flattened tensors, the blocks in
    float32 (exact upcasts of stored bf16/fp16 rows)."""
    flat, flats = base.reshape(-1), [other.reshape(-1) for other in others]
    for start, stop in blocks(flat.numel(), block_size(base.device)):
        yield start, stop, flat[start:stop].float(), [other[start:stop].float() for other in flats]


def _stats(source: RowSource, *, ram_epsilon: float, ramplus_r: float, ramplus_alpha: float
           ) -> list[float]:
    """λi = 1 + r·clamp(ρi, 0, alpha), ρi = #(i active, c > 1) / max(#(i active, c = 1),
    epsilon) over the whole tensor, counted block by block over the streamed chunks."""
    shared_counts, unique_counts = [0] * source.n_models, [0] * source.n_models
    for rows in source.chunks:
        for _, _, b, os in flat_blocks(*source.read_all(rows)):
            kept, count = active_deltas(b, os, ram_epsilon)
            unique, shared = count == 1, count > 1
            for i, delta in enumerate(kept):
                active = delta != 0
                shared_counts[i] += int((active & shared).sum())
                unique_counts[i] += int((active & unique).sum())
    return [1.0 + ramplus_r * min(max(s / max(u, ram_epsilon), 0.0), ramplus_alpha)
            for s, u in zip(shared_counts, unique_counts)]


def _apply(boosts: list[float], offset: int, base: Tensor, others: list[Tensor], *,  # noqa: ARG001
           ram_epsilon: float, out: Tensor | None = None, **_) -> Tensor:
    """The rows `base`, `others` merged with the whole tensor's boosts, block by block."""
    result = output_buffer(base, out).view(base.shape)
    flat_out = result.view(-1)
    for start, stop, b, os in flat_blocks(base, others):
        kept, count = active_deltas(b, os, ram_epsilon)
        unique = count == 1
        boosted = torch.zeros_like(b)
        for delta, boost in zip(kept, boosts):
            boosted += torch.where(unique, delta * boost, 0.0)
        averaged = sum(kept) / count.clamp(min=1.0)  # 0 where no model is active
        torch.add(b, torch.where(unique, boosted, averaged), out=flat_out[start:stop])
    return result


RAMPLUS_TWO_PASS = TwoPass(_stats, _apply)  # the active counts from the chunks, then the rows


def ramplus_tl(base: Tensor, others: list[Tensor], *, ram_epsilon: float = 1e-5,
               ramplus_r: float = 0.1, ramplus_alpha: float = 0.2) -> Tensor:
    """ram with each model's unique entries boosted by λi = 1 + r·clamp(ρi, 0, alpha), ρi its
    shared/unique active-entry ratio in this tensor (§19.10); float64 paper box:
    reference.ramplus_tl."""
    return merge_held(RAMPLUS_TWO_PASS, base, others, ram_epsilon=ram_epsilon,
                      ramplus_r=ramplus_r, ramplus_alpha=ramplus_alpha)
