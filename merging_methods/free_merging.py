"""FREE-Merging: the FR-Merging backbone plus one task's lightweight expert (Zheng & Wang,
arXiv 2411.16815; ALGORITHMS.md §11). Alias `free`.

The LLM variant is static (no router) and makes one checkpoint per task t. It holds whole
tensors, as fr_merging does (its 2-D FFT needs the whole δ; no two-pass form):

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
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from merging_methods.fr_merging import FR_RATIO, fr_merging
from merging_methods.primitives import keep_topk

EXPERT_DENSITY = 0.01  # ρ of the LLM reference


def expert(delta: Tensor, expert_density: float = EXPERT_DENSITY) -> Tensor:
    """E = δ on its ⌊ρ·n⌋ largest |δ| (lower index first among ties), zero elsewhere."""
    if math.floor(expert_density * delta.numel()) == 0:
        return delta.new_zeros(delta.shape)
    return delta * keep_topk(delta, expert_density)


def free_merging(base: Tensor, others: list[Tensor], *, weights: Sequence[float],
                 task_model: int, expert_density: float = EXPERT_DENSITY,
                 scaling: float = 1.0, normalize: bool = False, fr_ratio: float = FR_RATIO,
                 fr_faithful: bool = False) -> Tensor:
    """FREE-Merging (§11): the FR-merged tensor plus the expert of `others[task_model]`."""
    if not 0 <= task_model < len(others):
        raise ValueError(f"task_model: index {task_model} for {len(others)} models")
    merged = fr_merging(base, others, weights=weights, scaling=scaling, normalize=normalize,
                        fr_ratio=fr_ratio, fr_faithful=fr_faithful)
    return merged.add_(expert(others[task_model].float() - base.float(), expert_density))
