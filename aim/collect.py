"""Activation statistics of the base model for AIM (ALGORITHMS.md §12.2-12.3).

Statistic, per relaxable module and input channel c (x = the module's input in the base model):

    S_c = sum over calibration blocks of ( mean over the block's tokens of |x_c| )

computed and accumulated in float32 on the module's device (the reference used bf16), one running
sum per module. With `batch_size > 1` the mean is still taken per block, so results equal
`batch_size=1` up to float rounding.

Which modules (§12.2): every module with a `weight` tensor that is not an embedding (its name
contains "embed", or it is an `nn.Embedding`, e.g. GPT-2's `wte`/`wpe`). Axis of the weight that
holds the input channels: `nn.Linear` the last axis, transformers `Conv1D` axis 0, 1-D weights
(norms) elementwise (Gemma's per-head q_norm/k_norm: one statistic per head_dim channel, averaged
over tokens and heads); for other module types the last axis whose size equals the observed input
width. A module whose weight has no such axis, that never runs, or whose input is not a float
tensor is not relaxed and is listed in `ActivationStats.unrelaxed` with the reason, as are
parameters the hooks cannot see (>= 2-D parameters that are not a module `weight`, such as the
fused MoE experts of transformers 5). A tied lm_head (the same Parameter as the input embedding)
gets statistics but is marked in `ActivationStats.tied`; it is relaxed only on request.

Statistics are keyed by checkpoint tensor name: transformers 5 renames some weights on load
(Mixtral's `block_sparse_moe.gate` becomes `mlp.gate`), and `checkpoint_names` maps them back.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Mapping

import torch
from torch import nn

from aim.stats_io import ActivationStats
from checkpoints.errors import UserError

log = logging.getLogger(__name__)

_INPUT_KWARGS = ("hidden_states", "input")
HOOKS_CANNOT_SEE = "not a module weight (e.g. fused MoE experts): the hooks cannot see its input"


@dataclass(frozen=True)
class Target:
    """A weight to relax: its module and input-feature axis (None: decided from the input width)."""

    module: str
    axis: int | None


@dataclass(frozen=True)
class RelaxPlan:
    """Weights AIM relaxes, keyed by checkpoint tensor name, plus what it cannot relax and why."""

    targets: dict[str, Target]
    tied: dict[str, str]        # target -> checkpoint name of the embedding sharing its storage
    unrelaxed: dict[str, str]   # parameter name -> reason


def _is_embedding(name: str, module: nn.Module) -> bool:
    return "embed" in name or isinstance(module, nn.Embedding)


def _fixed_axis(module: nn.Module) -> int | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.weight.ndim - 1
    if isinstance(module, Conv1D):
        return 0
    return 0 if module.weight.ndim == 1 else None


def checkpoint_names(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Checkpoint tensor name of each model parameter; ones stored in another layout are left out."""
    if not hasattr(model, "config"):
        return {name: name for name in params}
    probes = {name: p.detach() for name, p in params.items()}  # distinct objects, matched by identity
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(probes))
    except Exception as err:  # internal transformers API; keep model names if it changes
        log.warning("could not map parameter names to checkpoint names (%s); using model names", err)
        return {name: name for name in params}
    by_id = {id(t): name for name, t in reverted.items()}
    return {name: by_id[id(p)] for name, p in probes.items() if id(p) in by_id}


def relaxable_modules(model: nn.Module) -> RelaxPlan:
    """The weights of §12.2 with their modules and axes; embeddings excluded, tied lm_head marked."""
    candidates: dict[str, tuple[str, nn.Module]] = {}
    embeddings: dict[str, torch.Tensor] = {}
    unrelaxed: dict[str, str] = {}
    for mname, module in model.named_modules():
        weight = getattr(module, "weight", None)
        pname = f"{mname}.weight" if mname else "weight"
        if isinstance(weight, torch.Tensor):
            if _is_embedding(mname, module):
                embeddings[pname] = weight
            else:
                candidates[pname] = (mname, module)
        for local, param in module.named_parameters(recurse=False):
            if local != "weight" and param.ndim >= 2 and not _is_embedding(mname, module):
                unrelaxed[f"{mname}.{local}"] = HOOKS_CANNOT_SEE
    names = checkpoint_names(model, {**embeddings, **{n: m.weight for n, (_, m) in candidates.items()}})
    targets, tied = {}, {}
    for pname, (mname, module) in candidates.items():
        if pname not in names:
            unrelaxed[pname] = "stored in another layout in the checkpoint"
            continue
        targets[names[pname]] = Target(mname, _fixed_axis(module))
        shared = [e for e, w in embeddings.items() if w is module.weight and e in names]
        if shared:
            tied[names[pname]] = names[shared[0]]
    return RelaxPlan(targets, tied, unrelaxed)


class InputStatistics:
    """Hook target: running float32 sums of per-block mean |input| per channel, one per module."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.non_float: set[str] = set()
        self._batch = (1, 0)  # (blocks, tokens per block) of the forward pass in progress

    def record_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on the whole model: remember the batch shape of `input_ids` / `inputs_embeds`."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = kwargs.get("inputs_embeds") if ids is None else ids
        if isinstance(ids, torch.Tensor) and ids.ndim >= 2:
            self._batch = (ids.shape[0], ids.shape[1])

    def hook(self, key: str, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        x = args[0] if args else next((kwargs[k] for k in _INPUT_KWARGS if k in kwargs), None)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            self.non_float.add(key)
            return
        tokens = x.detach().reshape(-1, x.shape[-1])  # [tokens, C]
        if tokens.shape[0] == 0:
            return
        blocks, seq = self._batch
        if blocks == 1:
            means = tokens.abs().mean(0, dtype=torch.float32)
        elif tokens.shape[0] == blocks * seq:
            means = tokens.view(blocks, seq, -1).abs().mean(1, dtype=torch.float32).sum(0)
        elif x.ndim >= 3 and x.shape[0] == blocks:   # [blocks, seq, heads, head_dim]: q/k norms
            means = x.detach().reshape(blocks, -1, x.shape[-1]).abs().mean(1, dtype=torch.float32).sum(0)
        else:
            raise UserError(f"module {key} saw {tokens.shape[0]} tokens in a batch of {blocks} blocks of "
                            f"{seq} (e.g. MoE routing), so per-block means are undefined; use --batch_size 1")
        if key in self.sums:
            self.sums[key] += means
        else:
            self.sums[key] = means

    def result(self) -> dict[str, torch.Tensor]:
        """The statistics so far, float32 on the CPU."""
        return {key: s.to("cpu", torch.float32).clone() for key, s in self.sums.items()}


@contextmanager
def input_statistics(model: nn.Module, modules: Mapping[str, str]) -> Iterator[InputStatistics]:
    """Hook `modules` ({key: module name}) of `model` for the duration; hooks always come off."""
    collector = InputStatistics()
    handles = []
    try:
        handles.append(model.register_forward_pre_hook(collector.record_batch, with_kwargs=True))
        for key, name in modules.items():
            hook = partial(collector.hook, key)
            handles.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
        yield collector
    finally:
        for handle in handles:
            handle.remove()


def collect_stats(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 1,
                  plan: RelaxPlan | None = None, progress: bool = True) -> ActivationStats:
    """Run `blocks` [n_blocks, block_size] through the base `model` and return its §12.3 statistics."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    plan = plan or relaxable_modules(model)
    device = getattr(model, "device", None) or next(model.parameters()).device
    with torch.inference_mode(), input_statistics(
        model, {key: t.module for key, t in plan.targets.items()}
    ) as collector, tqdm(total=blocks.shape[0], desc="AIM calibration", unit="block",
                         disable=not progress) as bar:
        for batch in blocks.split(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
            bar.update(batch.shape[0])
    result = _finish(model, plan, collector)
    log.info("AIM: statistics for %d weights from %d calibration blocks", len(result.stats), blocks.shape[0])
    return result


def _finish(model: nn.Module, plan: RelaxPlan, collector: InputStatistics) -> ActivationStats:
    """Resolve each statistic's weight axis and record every target that cannot be relaxed."""
    sums = collector.result()
    stats, axes, unrelaxed = {}, {}, dict(plan.unrelaxed)
    for key, target in plan.targets.items():
        if key in collector.non_float:
            unrelaxed[key] = "its input is not a floating-point tensor"
            continue
        if key not in sums:
            unrelaxed[key] = "did not run in the calibration forward pass"
            continue
        shape = tuple(model.get_submodule(target.module).weight.shape)
        width = sums[key].numel()
        fits = [i for i, size in enumerate(shape) if size == width]
        axis = target.axis if target.axis is not None else (fits[-1] if fits else None)
        if axis is None or axis not in fits:
            unrelaxed[key] = f"no axis of its weight {shape} has the input width {width}"
            continue
        stats[key], axes[key] = sums[key], axis
    result = ActivationStats(stats=stats, axes=axes, tied={k: v for k, v in plan.tied.items() if k in stats},
                             unrelaxed=unrelaxed)
    if unrelaxed:
        log.warning("AIM: %s", result.unrelaxed_summary())
    return result


def load_base_for_calibration(path: str, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """The base model for the calibration forward pass, in eval mode.

    On CUDA it is placed by accelerate with `device_map="auto"` (spread over all visible GPUs,
    CPU offload if needed), or pinned to one GPU when the device names an index (`cuda:1`).
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    kwargs: dict = {"dtype": dtype}
    if device.type == "cuda":
        kwargs["device_map"] = "auto" if device.index is None else {"": device.index}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--pretrained_model_name {path}: cannot load the base model ({reason[:200]})") from err
    if device.type != "cuda":
        model.to(device)
    model.config.use_cache = False
    return model.eval()
