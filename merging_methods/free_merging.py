"""FREE-Merging: the FR-Merging backbone plus one task's lightweight expert (Zheng & Wang,
arXiv 2411.16815; ALGORITHMS.md §11). Alias `free`.

The LLM variant is static (no router) and makes one checkpoint per task t:

    E_t = the top ρ fraction of |δ_t| (δ_t = θ_t − θ0: unfiltered, unweighted), per tensor,
          exactly ⌊ρ·n⌋ entries, lower flat index first among ties (§0.5); the rest zero
    out = fr_merging(θ0, θ1 … θN) + E_t      (the expert gets neither λ nor a weight)

We implement the intended expert, not the reference's (whose empty-slice bug makes E_t = 0, so
its published LLM numbers may be plain FR-Merging). A tensor too small for one entry
(⌊ρ·n⌋ = 0) gets no expert there: that is not an error.

What the runner must supply (`--free_task_model`, `--free_expert_density`):
* `task_model`: the index in `others` of the model named by `--free_task_model` (a path or
  hub id that must be one of the merged models, else a UserError naming the flag); a run
  makes the checkpoint of that one task, so one run per task model.
* `expert_density`: ρ from `--free_expert_density` (default 0.01, in (0, 1]).
* the FR-Merging parameters (`weights` per model, `scaling`, `normalize`, `fr_ratio`,
  `fr_faithful`), resolved per tensor as for `fr_merging`; no context keywords.
* the recipe record should name the task model, since each output belongs to one task.

Memory: streams (issue 14 §2), as fr_merging does: a matrix above one chunk goes in two passes,
the filtered spectra in scratch files (fr_merging.py) and the expert's exact top-k threshold
from streamed blocks (primitives.TopK over streamed.StreamedDeltas, the TIES trim's machinery),
then chunk by chunk; the same bits as the whole-tensor path.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from merging_methods import fr_merging as fr
from merging_methods.fr_merging import FR_RATIO, fr_merging
from merging_methods.gta_blocked import Sparsifier
from merging_methods.half_spectrum import chunk_delta
from merging_methods.primitives import Deltas, TopK, block_size, blocks
from merging_methods.streamed import HOLD_ONE_CHUNK, RowSource, StreamedDeltas, TwoPass

EXPERT_DENSITY = 0.01  # ρ of the LLM reference
Expert = tuple[Sparsifier, float]   # (the top-k trim or None for all of δ_t, 1; or 0: none)


def expert_plan(deltas: Deltas | StreamedDeltas, expert_density: float) -> Expert:
    """E_t's trim over the whole δ_t: none when ⌊ρ·n⌋ = 0, all of δ_t when it is n."""
    count = math.floor(expert_density * deltas.n)
    if count == 0:
        return None, 0.0
    return (None if count >= deltas.n else TopK(deltas, expert_density)), 1.0


def add_expert_(merged: Tensor, base: Tensor, task: Tensor, expert: Expert,
                offset: int = 0) -> Tensor:
    """merged += E_t on these entries (flat offset `offset`, applied in flat order)."""
    trim, factor = expert
    if factor == 0:
        return merged
    flat, base, task = merged.view(-1), base.reshape(-1), task.reshape(-1)
    for start, stop in blocks(flat.numel(), block_size(flat.device)):
        piece = chunk_delta(base[start:stop], task[start:stop])
        flat[start:stop].add_(piece if trim is None else trim.apply_(piece, offset + start))
    return merged


def check_task_model(task_model: int, n_models: int) -> None:
    """task_model must index one of the merged models."""
    if not 0 <= task_model < n_models:
        raise ValueError(f"task_model: index {task_model} for {n_models} models")


def free_merging(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
                 task_model: int, expert_density: float = EXPERT_DENSITY,
                 scaling: float = 1.0, normalize: bool = False, fr_ratio: float = FR_RATIO,
                 fr_faithful: bool = False, out: Tensor | None = None) -> Tensor:
    """FREE-Merging (§11): the FR-merged tensor plus the expert of `others[task_model]`
    (inputs and `out` as for fr_merging)."""
    check_task_model(task_model, len(others))
    merged = fr_merging(base, others, weights=weights, scaling=scaling, normalize=normalize,
                        fr_ratio=fr_ratio, fr_faithful=fr_faithful, out=out)
    task = others[task_model]
    expert = expert_plan(Deltas(base, task, block_size(base.device)), expert_density)
    return add_expert_(merged, base, task, expert)


def _stats(source: RowSource, *, task_model: int, expert_density: float = EXPERT_DENSITY,
           **params) -> tuple[fr.Spectra, Expert]:
    """The filtered spectra (fr_merging's) and the expert's trim from the streamed δ_t."""
    check_task_model(task_model, source.n_models)
    deltas = StreamedDeltas(source, task_model, block_size(source.device))
    return fr.FR_TWO_PASS.stats(source, **params), expert_plan(deltas, expert_density)


def _apply(facts: tuple[fr.Spectra, Expert], offset: int, base: Tensor, others: list[Tensor], *,
           task_model: int, expert_density: float = EXPERT_DENSITY,  # noqa: ARG001
           **params) -> Tensor:
    """The chunk at flat offset `offset`: fr_merging's chunk plus the expert's entries."""
    spectra, expert = facts
    merged = fr.FR_TWO_PASS.apply(spectra, offset, base, others, **params)
    return add_expert_(merged, base, others[task_model], expert, offset)


# fr_merging's two passes plus the expert's threshold
FREE_TWO_PASS = TwoPass(_stats, _apply, hold_elements=HOLD_ONE_CHUNK)
