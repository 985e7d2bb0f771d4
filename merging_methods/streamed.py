"""Two-pass merges of tensors too large to hold whole (issue 14 §2: flat memory).

Top-k thresholds (§0.5, §3.2), rank bands (§9), L1 rescale factors, dot products (§6, §8) and
column statistics (§5) need the whole tensor. For a matrix above `rows.TWO_PASS_ELEMENTS` the
runner hands such a method a `RowSource` (the tensor's row chunks, read on demand) instead of
whole tensors: the method's `TwoPass.stats` gathers those whole-tensor facts in streaming passes
over the chunks, then `TwoPass.apply` merges one chunk at a time with them. `StreamedDeltas`
yields the very float32 blocks `primitives.Deltas` yields over the whole tensor, so thresholds,
tie positions and L1 sums get the same bits as the one-pass path; sums the dense functions take
over row chunks use the same chunks (rows.row_ranges). Peak memory is a few chunks whatever the
tensor's size. Each pass reads the chunks again (from the page cache when memory allows); the
statistics passes run on a thread of their own, one tensor ahead of the merge (the runner's
_FactsAhead), so on two or more cores they cost little wall time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from checkpoints.rows import CHUNK_ELEMENTS, row_ranges
from merging_methods.gta_blocked import Plan, Sparsifier, blocked_gta, output_buffer, planned
from merging_methods.primitives import SAMPLE, Upcast, block_size

RowRange = tuple[int, int]
# the top-k sample's rows: 8-row bands at 32 places (256 rows in 32 reads; a read per row made
# the sample a tenth of TIES's time on the 542M family)
SAMPLE_BANDS, SAMPLE_BAND_ROWS = 32, 8
# entries of the two-pass tensors whose statistics may be started ahead of the merge at once
AHEAD_ELEMENTS = 1 << 26
# `TwoPass.hold_elements` of a method whose held path costs more than streaming (FR's in-memory
# spectra, DELLA's in-line draws, karcher's float32 copies): a matrix of more than one row chunk
# goes in two passes, the 2048 x 2048 ones too
HOLD_ONE_CHUNK = CHUNK_ELEMENTS


@dataclass(frozen=True)
class RowSource:
    """One tensor as the runner streams it: its shape, its row chunks in order,
    `read(rows, i)` -> (base rows, model i's rows) and `read_all(rows)` -> (base rows, every
    model's rows; the base read once), stored dtype, on the merge device; `scratch`: the folder
    for scratch files (the merge's staging folder; None: the system's temporary folder)."""

    shape: tuple[int, ...]
    chunks: tuple[RowRange, ...]
    read: Callable[[RowRange, int], tuple[Tensor, Tensor]]
    read_all: Callable[[RowRange], tuple[Tensor, list[Tensor]]]
    device: torch.device
    n_models: int
    scratch: Path | None = None

    @property
    def n(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TwoPass:
    """A method's form for large tensors: `stats(source, **params, **context)` returns what needs
    the whole tensor; `apply(stats, offset, base, others, **params, **context, out=None)` merges
    the chunk at flat offset `offset` (inputs in their stored dtype) to the bits of the method
    on the whole tensor. Chunks are applied in flat order, each once. `ahead`: the runner may
    gather the statistics on its thread for work ahead, beside the merge of earlier tensors,
    of up to this many entries at once (0: in line, on the merge thread). `hold_elements`: a
    matrix above this many entries goes in two passes even below rows.TWO_PASS_ELEMENTS (None:
    at that bound): for a method whose held path costs more, in memory or in statistics gathered
    in line with the merge instead of beside it."""

    stats: Callable[..., object]
    apply: Callable[..., Tensor]
    ahead: int = AHEAD_ELEMENTS
    hold_elements: int | None = None


def held_source(base: Tensor, others: list[Tensor]) -> RowSource:
    """Tensors held whole, as a RowSource in the runner's chunks (rows.row_ranges; a 1-D or 0-d
    tensor is one chunk, one row for row-wise statistics)."""
    shape = tuple(base.shape) if base.dim() else (1,)
    b, os = base.reshape(shape), [other.reshape(shape) for other in others]
    return RowSource(shape, tuple(row_ranges(shape, base.dim() >= 2)),
                     lambda r, i: (b[r[0]:r[1]], os[i][r[0]:r[1]]),
                     lambda r: (b[r[0]:r[1]], [o[r[0]:r[1]] for o in os]), base.device,
                     len(others))


def merge_held(form: TwoPass, base: Tensor, others: list[Tensor], *, out: Tensor | None = None,
               **kwargs) -> Tensor:
    """A method's whole-tensor function as its two-pass form over the held tensors (float32 or
    stored bf16/fp16): the same chunks, so the same bits as the runner's streamed merge of a
    large tensor. Float32 result, into `out` when given (`partial(merge_held, form)` is then
    the method's FastPath, registry.py)."""
    if base.numel() == 0:   # nothing to merge (and no row to take statistics of)
        return output_buffer(base, out).view(base.shape)
    source = held_source(base, others)
    stats = form.stats(source, **kwargs)
    out = output_buffer(base, out).view(source.shape)
    width = math.prod(source.shape[1:])
    for rows in source.chunks:
        chunk_base, chunk_others = source.read_all(rows)
        target = out[rows[0]:rows[1]]
        merged = form.apply(stats, rows[0] * width, chunk_base, chunk_others, **kwargs,
                            out=target)
        if merged.data_ptr() != target.data_ptr():   # a form that does not write into `out`
            target.copy_(merged)
    return out.view(base.shape)


class StreamedDeltas:
    """Model i's delta over a whole `RowSource`, as `Deltas` yields it: flat float32 blocks of
    `size` elements in flat order, bit for bit, assembled from the row chunks (a block may span
    two chunks). A yielded block is overwritten by the next one; callers may modify it."""

    def __init__(self, source: RowSource, model: int, size: int, upcast: Upcast | None = None):
        self.source, self.model = source, model
        self.n, self.size = source.n, size
        self._buf = torch.empty(min(size, self.n), dtype=torch.float32, device=source.device)
        self._upcast = upcast or Upcast(self._buf.numel(), source.device)   # shared: lockstep

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        start = filled = 0   # flat offset of the block being filled, entries in it so far
        for rows in self.source.chunks:
            base, other = (t.reshape(-1) for t in self.source.read(rows, self.model))
            pos = 0
            while pos < base.numel():
                take = min(self._buf.numel() - filled, base.numel() - pos)
                piece = self._buf[filled:filled + take]
                # one float32 subtraction of exact upcasts, as Deltas.block computes it
                below = base[pos:pos + take]
                piece.copy_(other[pos:pos + take])
                piece.sub_(below if below.dtype == torch.float32 else self._upcast.of(below))
                filled, pos = filled + take, pos + take
                if filled == min(self.size, self.n - start):
                    yield start, self._buf[:filled]
                    start, filled = start + filled, 0

    def new_buffer(self) -> Tensor:
        """An uninitialised float buffer of one block."""
        return torch.empty_like(self._buf)

    def sample(self) -> Tensor:
        """About SAMPLE entries of the delta from SAMPLE_BANDS evenly spaced bands of up to
        SAMPLE_BAND_ROWS rows, each band one read (a fresh tensor). Only a guess at a tied top-k
        threshold is taken from it, which a counting pass then verifies (primitives.plan_topk),
        so it need not be `Deltas`'s sample; a full pass for it would cost as much as the count."""
        rows = self.source.shape[0]
        first, stop = self.source.chunks[0]
        height = min(SAMPLE_BAND_ROWS, stop - first)   # no read above a chunk
        bands = [(b * rows // SAMPLE_BANDS, min(b * rows // SAMPLE_BANDS + height,
                                                (b + 1) * rows // SAMPLE_BANDS))
                 for b in range(SAMPLE_BANDS)]
        bands = [(a, z) for a, z in bands if z > a]
        picked = sum(z - a for a, z in bands)
        step = max(1, self.n // rows * picked // SAMPLE)   # one entry in `step` of those rows
        parts = []
        for band in bands:
            base, other = (t.reshape(-1) for t in self.source.read(band, self.model))
            parts.append(torch.sub(other[::step].float(), base[::step]))
        return torch.cat(parts)


class Shifted:
    """A sparsifier planned over the whole tensor, applied to a chunk at flat offset `offset`."""

    def __init__(self, inner: Sparsifier, offset: int):
        self.inner, self.offset = inner, offset

    def apply_(self, delta: Tensor, start: int) -> Tensor:
        return self.inner.apply_(delta, start + self.offset)


Planned = dict[int, tuple[Sparsifier, float]]  # active model -> (sparsifier, factor ci)


def two_pass_gta(plan_of: Callable[..., Plan], consensus: bool, ahead: int = AHEAD_ELEMENTS,
                 hold_elements: int | None = None) -> TwoPass:
    """The two-pass form of a §0.6 method whose `plan_of(**params, **context)` gives its Plan:
    stats = each active model's sparsifier and factor planned over the streamed whole delta
    (as blocked_gta plans them), apply = blocked_gta on the chunk with those plans; `ahead` and
    `hold_elements` as in TwoPass."""
    def stats(source: RowSource, *, weights, **params) -> Planned:
        size = block_size(source.device)
        models = [i for i, w in enumerate(weights) if w != 0]
        upcast = Upcast(min(size, source.n), source.device)   # the base's blocks, shared
        streams = [StreamedDeltas(source, i, size, upcast) for i in models]
        return dict(zip(models, planned(plan_of(**params), models, streams)))

    def apply(planned: Planned, offset: int, base: Tensor, others: list[Tensor], *, weights,
              normalize: bool, scaling: float, out: Tensor | None = None, **_) -> Tensor:
        def at(i: int, _deltas) -> tuple[Sparsifier, float]:
            sparsifier, factor = planned[i]
            return (None if sparsifier is None else Shifted(sparsifier, offset)), factor
        return blocked_gta(base, others, weights, at, consensus=consensus, normalize=normalize,
                           scaling=scaling, out=out)
    return TwoPass(stats, apply, ahead, hold_elements)
