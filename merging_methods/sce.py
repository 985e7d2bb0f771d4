"""SCE: select, calculate, erase (Wan et al. 2024, FuseChat, arXiv 2408.07990; mergekit's `sce`,
ALGORITHMS.md §19.7).

Per tensor, with δi = θi − θ0 for the N fine-tunes (no per-model weights):

    select (select_topk < 1): σ²_j = population variance of δ·j across the models;
        keep the K = floor(select_topk · #{σ² ≠ 0}) entries of largest σ² (lower flat index
        first among ties) in every δi, zero the rest (K = 0 or select_topk ≤ 0: all zero)
    calculate: ωi = mean_j δij², normalised to sum 1 (uniform 1/N when Σω < 1e-6)
    erase: s_j = +1 if Σi δij ≥ 0 else −1;  aij = [sign δij = s_j]
    out = θ0 + Σi ωi aij δij / max(Σi ωi aij, 1e-6)

Memory: it streams. The whole-tensor function is the two-pass form (streamed.py) over the
held tensor's row chunks (rows.row_ranges; also its fast path, on stored bf16/fp16 inputs into
the runner's result buffer), and a matrix above rows.TWO_PASS_ELEMENTS goes through the same
form chunk by chunk from the runner, so both give the same bits. Per chunk,
the deltas are recomputed in blocks of `block_size` entries in each pass: the count of σ² ≠ 0
(with a strided sample of σ²), the exact top-K threshold of σ² (primitives.plan_topk: a
counting pass when the sample shows a tie there, else a two-pass radix select; the kept run
of ties located as blocks pass in flat order, TieRun), ω, then the output. Only about 2N + 4
blocks (σ² in float64) are held besides the inputs' chunks and the output. ω's Σ δij² is summed in float32 per block
and the blocks in double, so its low bits (and the output's) may differ from one float32 dot
over the tensor.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from merging_methods.gta_blocked import output_buffer
from merging_methods.primitives import SAMPLE, TieRun, block_size, blocks, plan_topk
from merging_methods.streamed import RowSource, TwoPass, merge_held

WEIGHT_SUM_EPS = 1e-6  # Σω below this: uniform weights
DIVISOR_EPS = 1e-6  # floor of the agreeing weight sum
Chunk = tuple[int, Tensor, list[Tensor]]  # (flat offset, base rows, each model's rows): stored
Chunks = Callable[[], Iterable[Chunk]]  # a tensor's chunks in flat order, read again per call


def delta_blocks(offset: int, base: Tensor, others: list[Tensor]) -> Iterator[tuple[int, Tensor]]:
    """(flat start, the (N, block) float32 deltas there) over one chunk at flat `offset`, in
    flat order; the block buffer is reused."""
    flat, flats = base.reshape(-1), [other.reshape(-1) for other in others]
    size = min(block_size(base.device), max(flat.numel(), 1))
    buffer = torch.empty((len(others), size), dtype=torch.float32, device=base.device)
    for start, stop in blocks(flat.numel(), size):
        deltas = buffer[:, : stop - start]
        for row, other in zip(deltas, flats):  # exact upcasts, one float32 subtraction
            row.copy_(other[start:stop]).sub_(flat[start:stop])
        yield offset + start, deltas


def variance_(deltas: Tensor, out: Tensor, mean: Tensor, deviations: Tensor) -> Tensor:
    """σ² of each column of the (N, block) deltas, the population variance: the mean squared
    deviation from the column's mean, in float64, rounded into the float32 `out` (`mean`,
    `deviations`: float64 scratch of a block and of N blocks).

    In double, the same deltas in another model order give the same float32 σ² (but for a
    rounding boundary within 2^-29), so the stable tie rule sees the ties the float64 paper
    box sees; float32 rounding told them apart. torch.var over the short model axis would run
    ~30x slower on CPU."""
    width = deltas.shape[1]
    center = torch.mean(deltas, dim=0, dtype=torch.float64, out=mean[:width])
    squares = torch.sub(deltas, center, out=deviations[:, :width]).square_()
    return out[:width].copy_(torch.mean(squares, dim=0, out=mean[:width]))


class Selection:
    """The K entries of largest σ² (lower flat index first among ties), K = floor(select_topk ·
    #{σ² ≠ 0}), found in streaming passes over the chunks (an exact threshold, primitives.py);
    `apply_` zeroes the others in a block of deltas. Blocks must come in flat order (where the
    kept run of ties ends is found on the way, then remembered)."""

    def __init__(self, chunks: Chunks, n: int, n_models: int, select_topk: float,
                 device: torch.device):
        size = min(block_size(device), max(n, 1))
        self._variance = torch.empty(size, dtype=torch.float32, device=device)
        self._scratch = torch.empty_like(self._variance)
        self._mean = torch.empty(size, dtype=torch.float64, device=device)
        self._deviations = torch.empty((n_models, size), dtype=torch.float64, device=device)
        # every step-th flat entry's σ², for plan_topk's guess at a tied threshold; filled in
        # place (small tensors kept between the chunks' reads would fragment the heap)
        step, nonzero = max(1, n // SAMPLE), 0
        sample = torch.empty(-(-n // step), dtype=torch.float32, device=device)
        for start, variance in self._variances(chunks):
            nonzero += int(torch.count_nonzero(variance))
            first = -(-start // step)  # the sample's first entry in this block
            picked = variance[first * step - start::step]
            sample[first: first + picked.numel()] = picked
        k = math.floor(select_topk * nonzero) if select_topk > 0 else 0
        self.cut = None if k == 0 else plan_topk(lambda: self._variances(chunks), n, k,
                                                 self._scratch, sample)
        self.ties = None if self.cut is None else TieRun(self.cut.value, self.cut.keep_equal,
                                                         self.cut.equal, n)

    def _variances(self, chunks: Chunks) -> Iterator[tuple[int, Tensor]]:
        for offset, base, others in chunks():
            for start, deltas in delta_blocks(offset, base, others):
                yield start, self._variance_(deltas)

    def _variance_(self, deltas: Tensor) -> Tensor:
        return variance_(deltas, self._variance, self._mean, self._deviations)

    def apply_(self, deltas: Tensor, start: int) -> Tensor:
        """Zero, in place, the entries of the block (flat offset `start`) that are not kept."""
        if self.cut is None:  # K = 0: nothing kept
            return deltas.zero_()
        variance = self._variance_(deltas)
        keep = variance > self.cut.value
        cut = self.ties.cut(variance, start, self._scratch)  # the kept ties end inside [:cut]
        keep[:cut] |= variance[:cut] == self.cut.value
        return deltas.mul_(keep)


Stats = tuple[list[float], Selection | None]  # (ω, the top-K selection or None: keep all)


def selected_blocks(chunks: Iterable[Chunk], selection: Selection | None
                    ) -> Iterator[tuple[int, Tensor]]:
    """(flat start, the (N, block) deltas there, zeroed outside the selection), in flat order."""
    for offset, base, others in chunks:
        for start, deltas in delta_blocks(offset, base, others):
            yield start, deltas if selection is None else selection.apply_(deltas, start)


def sce_weights(chunks: Iterable[Chunk], n: int, n_models: int,
                selection: Selection | None) -> list[float]:
    """ωi = mean of the squared (selected) deltas, normalised to sum 1 (uniform when Σω is
    below WEIGHT_SUM_EPS); float32 dots per block, added in double."""
    squares = [0.0] * n_models
    for _, deltas in selected_blocks(chunks, selection):
        for i, delta in enumerate(deltas):
            squares[i] += float(torch.dot(delta, delta))
    weights = [square / max(n, 1) for square in squares]
    total = sum(weights)
    if abs(total) < WEIGHT_SUM_EPS:
        return [1.0 / n_models] * n_models
    return [weight / total for weight in weights]


def _stats(source: RowSource, *, select_topk: float) -> Stats:
    """ω and the selection, from streaming passes over the chunks (σ² recomputed per pass)."""
    width = math.prod(source.shape[1:])

    def chunks() -> Iterator[Chunk]:
        for rows in source.chunks:
            yield rows[0] * width, *source.read_all(rows)
    selection = Selection(chunks, source.n, source.n_models, select_topk, source.device) \
        if select_topk < 1 else None
    return sce_weights(chunks(), source.n, source.n_models, selection), selection


def _apply(stats: Stats, offset: int, base: Tensor, others: list[Tensor], *,
           out: Tensor | None = None, **_) -> Tensor:
    """The rows `base`, `others` (flat offset `offset`) merged with the whole tensor's ω and
    selection: sign election and the ω-weighted mean of the agreeing deltas, block by block."""
    weights, selection = stats
    result = output_buffer(base, out).view(base.shape)
    flat, flat_out = base.reshape(-1), result.view(-1)
    for start, deltas in selected_blocks([(offset, base, others)], selection):
        sign = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)  # (block,)
        mixed, divisor = torch.zeros_like(sign), torch.zeros_like(sign)
        for weight, delta in zip(weights, deltas):
            agree = delta.sign() == sign  # a zero delta never agrees
            mixed += torch.where(agree, delta * weight, 0.0)
            divisor += torch.where(agree, weight, 0.0)
        a, z = start - offset, start - offset + sign.numel()
        torch.add(flat[a:z], mixed / divisor.clamp_(min=DIVISOR_EPS), out=flat_out[a:z])
    return result


SCE_TWO_PASS = TwoPass(_stats, _apply)  # σ² selection and ω from the chunks, then the rows


def sce(base: Tensor, others: list[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """θ0 + the variance-selected, magnitude-weighted, sign-agreeing mean of the deltas (§19.7);
    float64 paper box: reference.sce."""
    return merge_held(SCE_TWO_PASS, base, others, select_topk=select_topk)
