"""DELLA and DELLA-linear (Deep, Bhardwaj & Poria 2024, arXiv 2406.11617; ALGORITHMS.md §17).

MAGPRUNE: drop task-vector entries at random with a keep probability that grows with the
entry's magnitude rank inside its row, rescale, then merge as GTA (§0.6). Per model, with
density p and epsilon ε (the half-width of the keep-probability window, p ± ε inside (0, 1)):

    rows: a 1-D δ is one row; otherwise rows run along axis 1 (per output row of [out, in])
    r = stable ascending rank of |δ| in its row (0 … m−1),  q = r/(m−1)  (q = ½ when m = 1)
    π = (p − ε) + 2ε·q;   keep = [u < π],  u ~ U[0,1) drawn on CPU from the model's generator
    δ̃ = δ ⊙ keep · ‖δ‖₁/‖δ ⊙ keep‖₁   (rescale "l1", tensor-wide; skipped below 1e-7)
         or δ ⊙ keep / π              (rescale "inverse_prob": the authors' code)
    della:        out = θ0 + λ·Σ_agree wi·δ̃i / Σ_agree wi   (normalize true by default)
    della_linear: out = θ0 + λ·Σ wi·δ̃i                      (normalize false by default)

p ≥ 1 leaves δ unchanged (no rescale); p ≤ 0 drops it entirely. The generators are the
runner's `mask_generator(seed, i, tensor_name)` (§17.3: §4.3's rule 1, kept for DELLA since π
varies per entry; DARE's masks follow mask rule 2, primitives.py).

π is per row, and torch.rand of a CPU generator drawn chunk of rows by chunk of rows gives the
bits of one draw of the whole shape (torch 2.13, checked by tests/test_two_pass.py), so a large
tensor is merged in row chunks with the same bits (RowDraws); only the l1 factor needs a pass
over the whole tensor first.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from checkpoints.errors import UserError
from merging_methods.gta import check_lengths
from merging_methods.gta_blocked import Plan, Sparsifier, blocked_gta
from merging_methods.primitives import MATCH_L1, Deltas, MatchL1, PresetDrop, dense_delta
from merging_methods.streamed import StreamedDeltas

RESCALE_MODES = ("l1", "inverse_prob")
# elements (whole rows, at least one) drawn at once by the two-pass form: the int64 argsort
# indices of a whole 4M-element row chunk (several 32 MB temporaries) raised its peak RSS
DRAW_ELEMENTS = 1 << 18


def check_window(density: float, epsilon: float) -> None:
    """p ± ε must lie strictly inside (0, 1) when 0 < p < 1 (§17.2 step 2, float64 as written)."""
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise UserError(f"--epsilon: epsilon must keep density ± epsilon inside (0, 1); got "
                        f"density {density} and epsilon {epsilon}")


def keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """π = (p − ε) + 2ε·q per entry, q the normalised stable rank of |δ| along axis 1 (§17.2).

    A 0-D or 1-D δ is one row; float32, shaped like δ."""
    rows = delta.reshape(1, -1) if delta.dim() <= 1 else delta
    m = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)  # ascending, lower index first
    # each entry's rank: the inverse permutation, scattered (a second argsort cost as much again)
    positions = torch.arange(m, dtype=torch.float32, device=rows.device)
    ranks = torch.empty(rows.shape, dtype=torch.float32, device=rows.device).scatter_(
        1, order, positions.view(1, m, *[1] * (rows.dim() - 2)).expand_as(order))
    q = ranks / (m - 1) if m > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + (2 * epsilon) * q).view_as(delta)


Draw = Callable[[Deltas, int, float, float, bool], Sparsifier]  # (δ, i, p, ε, inverse) -> mask


def _magprune_plan(density: Sequence[float], epsilon: Sequence[float],
                   generators: list[torch.Generator] | None, rescale: bool,
                   rescale_mode: str, draw: Draw) -> Plan:
    """Model i's Bernoulli(π) keep-mask, rescaled by L1 matching or by 1/π (§17.2 steps 1-8);
    `draw` gives the mask (keep/π with `inverse`): whole (`_whole_draw`) or by rows (RowDraws)."""
    if rescale_mode not in RESCALE_MODES:
        raise ValueError(f"rescale_mode: unknown mode {rescale_mode!r}; choose one of "
                         f"{RESCALE_MODES}")

    def plan(i: int, deltas: Deltas) -> tuple[Sparsifier, float | MatchL1]:
        p, eps = density[i], epsilon[i]
        if p >= 1:
            return None, 1.0
        if p <= 0:
            return PresetDrop(torch.zeros(1, dtype=torch.bool).expand(deltas.n)), 1.0
        check_window(p, eps)
        if generators is None:
            raise ValueError("DELLA with density < 1 needs one generator per model")
        inverse = rescale and rescale_mode == "inverse_prob"
        drop = draw(deltas, i, p, eps, inverse)
        return drop, MATCH_L1 if rescale and not inverse else 1.0
    return plan


def row_groups(shape: tuple[int, ...], chunks: Iterable[tuple[int, int]]
               ) -> Iterator[tuple[int, int]]:
    """Ranges of whole rows (axis 0) of about DRAW_ELEMENTS elements inside each chunk."""
    step = max(1, DRAW_ELEMENTS // max(math.prod(shape[1:]), 1))
    for first, stop in chunks:
        for start in range(first, stop, step):
            yield start, min(start + step, stop)


def drawn_masks(deltas: Iterable[Tensor], generator: torch.Generator, p: float, eps: float,
                inverse: bool) -> Iterator[Tensor]:
    """The flat mask (keep/π with `inverse`) of each δ in turn, the next draws of `generator`.

    π is per row along axis 1, so δ given as consecutive groups of axis-0 rows gives the
    bits of one draw of the whole: only a group's rank temporaries (int64 argsort indices)
    are ever held."""
    for delta in deltas:
        prob = keep_probabilities(delta, p, eps)
        keep = torch.rand(delta.shape, generator=generator).to(prob.device) < prob
        yield (keep / prob if inverse else keep).reshape(-1)


def _whole_draw(shape: torch.Size, generators: list[torch.Generator]) -> Draw:
    """The mask of the whole tensor: one torch.rand of its shape, drawn by row groups."""
    def draw(deltas: Deltas, i: int, p: float, eps: float, inverse: bool) -> Sparsifier:
        if len(shape) < 2:   # one row
            parts = [dense_delta(deltas).view(shape)]
        else:
            base, other = deltas.base.view(shape), deltas.other.view(shape)
            parts = (torch.sub(other[a:b].float(), base[a:b])
                     for a, b in row_groups(shape, [(0, shape[0])]))
        return PresetDrop(torch.cat(list(drawn_masks(parts, generators[i], p, eps, inverse))))
    return draw


class RowDraws:
    """The mask `_whole_draw` gives, drawn a few rows at a time (streamed.py's two-pass form).

    π is per row (axis 1), and a CPU generator's torch.rand of some rows continues the
    stream where the previous rows stopped, so rows in order give the whole draw. Blocks
    must come in flat order; one at flat offset 0 starts a new pass from the generator's state
    at construction (the runner's generator itself is never advanced). The runner streams
    matrices only (a 1-D δ is one row).
    """

    def __init__(self, deltas: StreamedDeltas, generator: torch.Generator, p: float, eps: float,
                 inverse: bool):
        self.source, self.model, self.p, self.eps, self.inverse = (
            deltas.source, deltas.model, p, eps, inverse)
        self._state = generator.get_state()
        self._generator = torch.Generator(device="cpu")

    def _masks(self) -> Iterator[Tensor]:
        """The flat masks of each chunk's row groups, in order (a suspended stream holds no
        inputs)."""
        self._generator.set_state(self._state)
        deltas = (torch.sub(other.float(), base) for base, other in
                  (self.source.read(rows, self.model)
                   for rows in row_groups(self.source.shape, self.source.chunks)))
        return drawn_masks(deltas, self._generator, self.p, self.eps, self.inverse)

    def apply_(self, delta: Tensor, start: int) -> Tensor:
        if start == 0:
            empty = torch.empty(0, dtype=torch.bool, device=delta.device)  # keeps bool masks bool
            self._stream, self._window, self._offset = self._masks(), empty, 0
        stop = start + delta.numel()
        while self._offset + self._window.numel() < stop:  # extend past the block's end
            kept = self._window[start - self._offset:]
            self._window, self._offset = torch.cat([kept, next(self._stream)]), start
        delta.mul_(self._window[start - self._offset: stop - self._offset])
        if stop == self.source.n:   # the pass is over: free the last chunk's draws now (the
            self._stream.close()    # suspended stream and self form a cycle only gc breaks)
            self._stream = self._window = None
        return delta


def _row_draw(generators: list[torch.Generator]) -> Draw:
    def draw(deltas: StreamedDeltas, i: int, p: float, eps: float, inverse: bool) -> Sparsifier:
        return RowDraws(deltas, generators[i], p, eps, inverse)
    return draw


def magprune_plan(*, density: Sequence[float], epsilon: Sequence[float], rescale: bool,
                  rescale_mode: str, generators: list[torch.Generator], **_) -> Plan:
    """The two-pass form's plan (streamed.py): masks drawn by rows, the L1 factor streamed."""
    return _magprune_plan(density, epsilon, generators, rescale, rescale_mode,
                          _row_draw(generators))


def _della_method(consensus: bool, normalize_default: bool) -> Callable[..., Tensor]:
    """della (sum-elected signs) or della_linear (plain sum): one body, two methods."""
    def method(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
               density: Sequence[float], epsilon: Sequence[float], scaling: float = 1.0,
               normalize: bool = normalize_default, rescale: bool = True,
               rescale_mode: str = "l1",
               generators: list[torch.Generator] | None = None) -> Tensor:
        """DELLA (§17): MAGPRUNE each δi, then θ0 + λ·Σ wi·δ̃i; `della` sums the sign-agreeing
        models and normalises, `della_linear` sums all of them."""
        check_lengths(others, density=density, epsilon=epsilon, generators=generators)
        plan = _magprune_plan(density, epsilon, generators, rescale, rescale_mode,
                              _whole_draw(base.shape, generators))
        return blocked_gta(base, others, weights, plan, consensus=consensus, normalize=normalize,
                    scaling=scaling, out=None)
    return method


della, della_linear = _della_method(True, True), _della_method(False, False)
