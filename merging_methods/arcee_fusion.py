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
The quantiles are selected, not sorted: a radix select on the float bits (`ranked_values`, two
streaming passes over the importance; one histogram serves the three ranks). Memory: it
streams. The whole-tensor function is the two-pass form (streamed.py) over the held tensor's
row chunks (also its fast path, on stored bf16/fp16 inputs into the runner's result buffer),
and a matrix above rows.TWO_PASS_ELEMENTS goes through the same form chunk by chunk
from the runner: κ per row in one pass, the quantiles in two more (I recomputed per chunk from
κ), the output chunk by chunk; with the mergekit sample, one pass gathers the drawn entries in
position order (the same multiset, so the same quantiles, as the whole tensor's draw). Every
step is per row or per entry (pieces of about ROW_CHUNK entries), so the chunks change no bit;
besides the inputs' chunks it holds κ (one float a row), chunk-sized temporaries and, with the
sample, the 10^6 draws and their values.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from merging_methods.gta_blocked import output_buffer
from merging_methods.streamed import RowSource, TwoPass, merge_held

PROB_EPS = 1e-8  # added to both softmaxes before the log ratio
SAMPLE_SIZE = 1_000_000  # mergekit's quantile sample, drawn only from larger tensors
IQR_FACTOR = 1.5
ROW_CHUNK = 1 << 18  # entries per piece of rows of the softmaxes, importance and output
BUCKETS = 1 << 16  # radix-select buckets: the top 16 bits of an order key, then the low 16
Importance = Callable[[], Iterable[tuple[int, Tensor]]]  # (flat offset, flat I there), in order


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


def order_keys(values: Tensor) -> Tensor:
    """int32 keys that order like the float32 `values` (−0 just below +0; no NaN): the bit
    pattern, with the magnitude bits of negative values flipped."""
    bits = values.view(torch.int32)
    return torch.bitwise_right_shift(bits, 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)


def _bucket_and_rank(hist: Tensor, rank: int) -> tuple[int, int]:
    """The bin of `hist` holding the 0-based ascending `rank`, and the rank inside that bin."""
    cum = hist.cumsum(0)
    index = int(torch.searchsorted(cum, rank, right=True))
    return index, rank - (int(cum[index - 1]) if index else 0)


def ranked_values(values: Callable[[], Iterable[Tensor]], ranks: list[int]) -> list[Tensor]:
    """sorted(values)[r] for each 0-based ascending rank r, as float32 0-d tensors, by a radix
    select on `order_keys` in two passes over the flat float32 blocks `values()` yields: one
    histogram of the top 16 bits serves every rank, then one of the low 16 bits inside each
    bucket holding a rank (O(n), no sort, nothing held but the histograms)."""
    high = torch.zeros(BUCKETS, dtype=torch.int64)
    for block in values():
        top = order_keys(block).bitwise_right_shift_(16).add_(BUCKETS // 2)  # 0 .. BUCKETS-1
        high += torch.bincount(top, minlength=BUCKETS).cpu()
    located = [_bucket_and_rank(high, rank) for rank in ranks]
    buckets = sorted({bucket for bucket, _ in located})
    low = torch.zeros(len(buckets), BUCKETS, dtype=torch.int64)
    for block in values():
        keys = order_keys(block)
        top = torch.bitwise_right_shift(keys, 16).add_(BUCKETS // 2)
        for row, bucket in zip(low, buckets):
            row += torch.bincount(keys[top == bucket].bitwise_and_(BUCKETS - 1),
                                  minlength=BUCKETS).cpu()
    picked = []
    for bucket, inside in located:
        bits, _ = _bucket_and_rank(low[buckets.index(bucket)], inside)
        key = torch.tensor((bucket - BUCKETS // 2) * BUCKETS + bits, dtype=torch.int32)
        picked.append(order_keys(key.view(torch.float32)).view(torch.float32))  # its own inverse
    return picked


def drawn_entries(importance: Importance, picks: Tensor) -> Tensor:
    """The entries at the flat positions `picks` (with repeats, on CPU), gathered chunk by
    chunk in ascending position order into one CPU tensor filled in place (a reordering of
    importance[picks]: the same quantiles)."""
    ordered = picks.sort().values
    drawn = torch.empty(ordered.numel(), dtype=torch.float32)
    for offset, flat in importance():
        a, z = (int(torch.searchsorted(ordered, bound)) for bound in (offset,
                                                                         offset + flat.numel()))
        drawn[a:z] = flat[(ordered[a:z] - offset).to(flat.device)].cpu()
    return drawn


def fusion_threshold(importance: Importance, n: int, sample: str,
                     generator: torch.Generator | None) -> Tensor:
    """τ = median + 1.5·IQR of the n entries of the importance (lower quantiles), over all
    of them ("exact") or over SAMPLE_SIZE entries drawn with replacement from larger tensors
    ("mergekit")."""
    if sample == "mergekit" and n > SAMPLE_SIZE:
        if generator is None:
            raise ValueError("arcee_fusion_sample=mergekit needs the model's generator")
        picks = torch.randint(n, (SAMPLE_SIZE,), generator=generator, device=generator.device)
        drawn = drawn_entries(importance, picks)
        blocks, n = (lambda: [drawn]), SAMPLE_SIZE
    else:
        blocks = lambda: (flat for _, flat in importance())  # noqa: E731
    low, median, high = ranked_values(blocks, [math.floor(phi * (n - 1))
                                               for phi in (0.25, 0.5, 0.75)])
    return median + IQR_FACTOR * (high - low)


def row_pieces(base: Tensor, other: Tensor) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """(last-axis rows, base there, other there) of a chunk in float32 pieces of about
    ROW_CHUNK entries (a 1-D tensor is one row)."""
    b, o = base.reshape(-1, base.shape[-1]), other.reshape(-1, base.shape[-1])
    step = max(1, ROW_CHUNK // max(b.shape[1], 1))
    for start in range(0, b.shape[0], step):
        rows = slice(start, start + step)
        yield rows, b[rows].float(), o[rows].float()


def importance_pieces(kappa: Tensor, offset: int, base: Tensor, other: Tensor
                      ) -> Iterator[tuple[int, slice, Tensor, Tensor, Tensor]]:
    """(flat offset, last-axis rows, base, other, I = |θ1 − θ0|·κ) of each piece (row_pieces)
    of the chunk at flat offset `offset`; κ: the whole tensor's, per last-axis row."""
    width = base.shape[-1]
    first = offset // width
    for rows, b, o in row_pieces(base, other):
        own = kappa[first + rows.start: first + rows.start + b.shape[0]]
        yield offset + rows.start * width, rows, b, o, torch.mul(torch.sub(o, b).abs_(), own)


Stats = tuple[Tensor, Tensor]  # (κ of every last-axis row (R, 1), the threshold τ)


def _stats(source: RowSource, *, arcee_fusion_sample: str,
           generators: list[torch.Generator] | None = None) -> Stats:
    """κ per row in one pass over the chunks, then τ from the importance recomputed per pass."""
    width = math.prod(source.shape[1:])
    # filled in place (small tensors kept between the chunks' reads would fragment the heap)
    kappa = torch.empty(source.n // source.shape[-1], 1, dtype=torch.float32,
                        device=source.device)
    for rows in source.chunks:
        first = rows[0] * width // source.shape[-1]
        for piece, b, o in row_pieces(*source.read(rows, 0)):
            kappa[first + piece.start: first + piece.start + b.shape[0]] = row_kl(b, o)

    def importance() -> Iterator[tuple[int, Tensor]]:
        for rows in source.chunks:
            for start, _, _, _, piece in importance_pieces(kappa, rows[0] * width,
                                                           *source.read(rows, 0)):
                yield start, piece.view(-1)
    return kappa, fusion_threshold(importance, source.n, arcee_fusion_sample,
                                   generators[0] if generators else None)


def _apply(stats: Stats, offset: int, base: Tensor, others: list[Tensor], *,
           out: Tensor | None = None, **_) -> Tensor:
    """θ0 + the changes of the rows whose importance reaches the whole tensor's τ."""
    kappa, threshold = stats
    result = output_buffer(base, out).view(base.shape)
    flat = result.view(-1, base.shape[-1])
    for _, rows, b, o, importance in importance_pieces(kappa, offset, base, others[0]):
        torch.add(b, torch.sub(o, b).masked_fill_(importance < threshold, 0.0), out=flat[rows])
    return result


ARCEE_FUSION_TWO_PASS = TwoPass(_stats, _apply)  # κ and τ from the chunks, then the rows


def arcee_fusion(base: Tensor, others: list[Tensor], *, arcee_fusion_sample: str = "exact",
                 generators: list[torch.Generator] | None = None) -> Tensor:
    """θ0 plus the changes of `others[0]` whose KL-weighted importance reaches the median +
    1.5·IQR threshold (§19.9); float64 paper box: reference.arcee_fusion."""
    if len(others) != 1:
        raise ValueError(f"arcee_fusion merges the base with exactly 1 other model, got "
                         f"{len(others)}")
    return merge_held(ARCEE_FUSION_TWO_PASS, base, others,
                      arcee_fusion_sample=arcee_fusion_sample, generators=generators)
