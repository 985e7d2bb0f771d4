"""WIDEN: merge by per-column magnitude and direction changes (ALGORITHMS.md §5).

Yu et al. 2024, "Extend Model Merging from Fine-Tuned to Pre-Trained Large Language Models via
Weight Disentanglement" (arXiv 2408.03092). For a 2-D weight [out, in] and each fine-tune i:

    m(W)_j = ‖W[:, j]‖,  D(W)[:, j] = W[:, j] / max(m_j, 1e-12)
    Mi_j = |m(Wi)_j − m(W0)_j|,  Ci_j = 1 − cos(D(Wi)[:, j], D(W0)[:, j])
    rank columns of Mi (and of Ci) ascending, stable: r = k/n;  score = softmax over models of r,
    replaced by s where 2k > t·(n − 1);  w = (score_M + score_C)/2
    out[:, j] = W0[:, j] + Σi wi_j · (Wi − W0)[:, j]

The input embedding is transposed first (one score per token). 1-D tensors use |δ| per element
(§5.3); tensors with more than 2 dimensions are viewed as [shape[0], −1].
A matrix too large to hold whole gets its unit statistics from blocks of rows read on demand
(StreamedMatrix: the very blocks `Units` takes), then is merged chunk by chunk (streamed.py).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from merging_methods.primitives import block_size
from merging_methods.streamed import RowSource, TwoPass, merge_held

NORM_EPS = 1e-12  # column norms are clamped to this before dividing (§5.2 step 1)
COS_EPS = 1e-8  # cosine denominators are clamped to this (§5.2 step 2)


class Units:
    """The units WIDEN scores in a stored 2-D matrix: its columns, or its rows when transposed.

    The input embedding [vocab, hidden] is scored per token, i.e. per row, as if transposed
    (§5.2); working on the stored rows keeps every block contiguous. Elementwise work runs a
    block of rows at a time in one reused scratch buffer (freed temporaries would be handed
    back to the OS and page-faulted in again for every block).
    """

    def __init__(self, like: Tensor, transposed: bool):
        rows, cols = like.shape
        self.transposed = transposed
        self.count = rows if transposed else cols
        self.step = max(1, block_size(like.device) // max(cols, 1))
        self.rows = rows
        self._scratch = torch.empty(min(self.step, rows), cols, dtype=like.dtype,
                                    device=like.device)

    def blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """(row slice, scratch block of that many rows), covering the matrix."""
        for start in range(0, self.rows, self.step):
            stop = min(start + self.step, self.rows)
            yield slice(start, stop), self._scratch[: stop - start]

    def spread(self, values: Tensor, rows: slice) -> Tensor:
        """A per-unit vector, broadcastable against the block `rows` of the matrix."""
        return values[rows, None] if self.transposed else values

    def sums(self, fill: Callable[[slice, Tensor], Tensor]) -> Tensor:
        """Per-unit sums of the blocks `fill(rows, scratch)` writes into the scratch buffer."""
        total = torch.zeros(self.count, dtype=self._scratch.dtype, device=self._scratch.device)
        for rows, scratch in self.blocks():
            block = fill(rows, scratch)
            if self.transposed:
                torch.sum(block, 1, out=total[rows])
            else:
                total += block.sum(0)
        return total

    def norms(self, matrix: Tensor) -> Tensor:
        """‖unit‖₂ for every unit of `matrix`."""
        return self.sums(lambda rows, buf: torch.square(matrix[rows], out=buf)).sqrt_()

    def select(self, matrix: Tensor, index: Tensor) -> Tensor:
        """The units `index` of `matrix`, as the columns of a small [features, len(index)] matrix."""
        return matrix.index_select(0, index).T if self.transposed else matrix.index_select(1, index)


def direction_change(w0: Tensor, wi: Tensor, units: Units,
                     m0: Tensor) -> tuple[Tensor, Tensor]:
    """Per-unit norm change |m(Wi) − m(W0)| and direction change 1 − cos(D(Wi), D(W0)).

    `m0` holds the unit norms of `w0` (`units.norms(w0)`).
    For units with both norms >= 1e-12, 1 − cos equals ½‖D(Wi) − D(W0)‖², computed that way so
    that the tiny turns of a fine-tune keep their relative precision in float32; the few
    degenerate (near-zero) units use the literal clamped formula.
    """
    mi = units.norms(wi)
    inv0, invi = 1.0 / m0.clamp(min=NORM_EPS), 1.0 / mi.clamp(min=NORM_EPS)

    def turn(rows: slice, buf: Tensor) -> Tensor:  # D(Wi) − D(W0) on these rows, squared
        torch.mul(wi[rows], units.spread(invi, rows), out=buf)
        return buf.addcmul_(w0[rows], units.spread(inv0, rows), value=-1).square_()

    change = units.sums(turn).mul_(0.5)
    degenerate = torch.nonzero((m0 < NORM_EPS) | (mi < NORM_EPS)).flatten()
    if degenerate.numel():
        d0 = units.select(w0, degenerate) * inv0[degenerate]
        di = units.select(wi, degenerate) * invi[degenerate]
        norms = torch.linalg.vector_norm(d0, dim=0) * torch.linalg.vector_norm(di, dim=0)
        change[degenerate] = 1.0 - (d0 * di).sum(0) / norms.clamp(min=COS_EPS)
    return (mi - m0).abs_(), change


def rank_scores(values: Tensor, ratio: float, calibration: float) -> Tensor:
    """Scores from per-model column statistics [N, n] (§5.2 steps 3-4).

    Stable ascending rank k per model gives r = k/n; the score is the softmax of r over models,
    or `calibration` where 2k > ratio·(n − 1) (r above ratio × the mean rank (n − 1)/(2n)).
    """
    n = values.shape[1]
    order = torch.argsort(values, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=values.device).expand_as(order))
    scores = torch.softmax(ranks.to(values.dtype) / n, dim=0)
    important = (2 * ranks).double() > ratio * (n - 1)
    return scores.masked_fill_(important, calibration)


def widen_weights(w0: Tensor, ws: list[Tensor], units: Units, ratio: float,
                  calibration: float) -> Tensor:
    """[N, units] merge weights of the 2-D `ws` against `w0` (§5.2 steps 1-5, stored layout).
    The matrices are only read a block of rows at a time (`matrix[rows]`, `index_select`)."""
    m0 = units.norms(w0)
    changes = [direction_change(w0, w, units, m0) for w in ws]
    magnitude = torch.stack([c[0] for c in changes])  # [N, units]
    direction = torch.stack([c[1] for c in changes])
    return (rank_scores(magnitude, ratio, calibration)
            + rank_scores(direction, ratio, calibration)).mul_(0.5)


def merge_rows(w0: Tensor, ws: list[Tensor], out: Tensor, units: Units, weights: Tensor) -> None:
    """out = w0 + Σi weights_i · (Wi − W0) per unit, a block of rows at a time; with transposed
    units, `weights` holds these rows' entries."""
    for rows, delta in units.blocks():
        acc = out[rows]
        acc.copy_(w0[rows])
        for w, wi in zip(ws, weights):
            acc.addcmul_(torch.sub(w[rows], w0[rows], out=delta), units.spread(wi, rows))


def _widen_elementwise(base: Tensor, others: list[Tensor], out: Tensor, ratio: float,
                       calibration: float) -> None:
    """1-D WIDEN (§5.3): softmax over models of |δi|, s where |δi| > ratio·mean|δi|."""
    deltas = torch.stack([o - base for o in others])  # [N, n]
    significance = deltas.abs()
    scores = torch.softmax(significance, dim=0)
    important = significance > ratio * significance.mean(dim=1, keepdim=True)
    scores.masked_fill_(important, calibration)
    torch.add(base, (scores * deltas).sum(0), out=out)


def widen(base: Tensor, others: list[Tensor], *, above_average_value_ratio: float = 1.0,
          score_calibration_value: float = 1.0, is_input_embedding: bool = False) -> Tensor:
    """WIDEN merge of one tensor (§5): no per-model weights, no scale, no randomness.

    `is_input_embedding` transposes a [vocab, hidden] embedding so that its columns are tokens.
    Paper box: reference.widen.
    """
    result = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
    if base.numel() == 0:
        return result.view_as(base)
    if base.dim() <= 1:
        _widen_elementwise(base.reshape(-1), [o.reshape(-1) for o in others], result,
                           above_average_value_ratio, score_calibration_value)
        return result.view_as(base)

    rows = base.shape[0]
    matrix, models = base.reshape(rows, -1), [o.reshape(rows, -1) for o in others]
    units = Units(matrix, transposed=is_input_embedding)
    weights = widen_weights(matrix, models, units, above_average_value_ratio,
                            score_calibration_value)
    merge_rows(matrix, models, result.view(rows, -1), units, weights)
    return result.view_as(base)


class StreamedMatrix:
    """A model's tensor of a RowSource (streamed.py) as the [rows, -1] float32 matrix
    widen_weights reads: rows and selected units are read from the checkpoint on demand, so
    the statistics pass holds a block of rows, never the matrix. Model None is the base."""

    dtype = torch.float32

    def __init__(self, source: RowSource, model: int | None):
        self.source, self.model = source, model
        self.shape = (source.shape[0], source.n // max(source.shape[0], 1))
        self.device = source.device

    def __getitem__(self, rows: slice) -> Tensor:
        base, other = self.source.read((rows.start, rows.stop),
                                       0 if self.model is None else self.model)
        return (base if self.model is None else other).float().reshape(-1, self.shape[1])

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        """Whole rows (dim 0) or whole columns (dim 1, read a CPU block of rows at a time)."""
        if dim == 0:
            return torch.cat([self[slice(r, r + 1)] for r in index.tolist()])
        step = max(1, block_size(torch.device("cpu")) // max(self.shape[1], 1))
        return torch.cat([self[slice(r, min(r + step, self.shape[0]))].index_select(1, index)
                          for r in range(0, self.shape[0], step)])


def _stats(source: RowSource, *, above_average_value_ratio: float,
           score_calibration_value: float, is_input_embedding: bool) -> Tensor:
    w0 = StreamedMatrix(source, None)
    units = Units(w0, transposed=is_input_embedding)
    return widen_weights(w0, [StreamedMatrix(source, i) for i in range(source.n_models)], units,
                         above_average_value_ratio, score_calibration_value)


def _apply(weights: Tensor, offset: int, base: Tensor, others: list[Tensor], *,
           is_input_embedding: bool, out: Tensor | None = None, **_) -> Tensor:
    rows = base.shape[0]
    matrix, models = base.float().reshape(rows, -1), [o.float().reshape(rows, -1) for o in others]
    result = torch.empty(base.numel(), dtype=torch.float32, device=base.device) if out is None \
        else out.view(-1)
    units = Units(matrix, transposed=is_input_embedding)
    if is_input_embedding:   # a weight per row: this chunk's rows
        first = offset // matrix.shape[1]
        weights = weights[:, first:first + rows]
    merge_rows(matrix, models, result.view(rows, -1), units, weights)
    return result.view(base.shape)


# the unit statistics in streaming passes, then the rows (the runner streams matrices only); not
# ahead of the merge: beside it they raised peak RSS on the 4x-embedding family by 40 MB
# (0.46 -> 0.50 GB) for no speed
WIDEN_TWO_PASS = TwoPass(_stats, _apply, ahead=0)


def widen_held(base: Tensor, others: list[Tensor], *, out: Tensor | None = None,
               **params) -> Tensor:
    """`widen`'s bits on a held tensor, the runner's fast path: a matrix through the two-pass
    form over its row chunks (stored-dtype inputs; no whole-tensor float32 copies, whose freed
    gaps grew the heap: peak RSS on the 542M family 0.42-0.50 -> 0.40-0.42 GiB, no slower), a
    1-D tensor (|δ| per element, §5.3) through `widen` on float32 copies. Float32 result, into
    `out` when given."""
    if base.dim() >= 2:
        return merge_held(WIDEN_TWO_PASS, base, others, out=out, **params)
    merged = widen(base.float(), [other.float() for other in others], **params)
    return merged if out is None else out.copy_(merged)
