"""run_merge: preflight -> per-tensor merge loop -> sharded write -> side files.

This is the only code that loops over tensor names, chooses the device and dtypes, seeds
randomness and decides what happens to tensors that are not merged. Peak memory is about
(number of models + 2) x the largest tensor in float32, plus one output shard.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from merging_methods.checkpoint import (
    CheckpointReader, ShardedWriter, copy_model_files, dtype_config_update, parse_dtype, parse_size,
    resolve_model_dir, staged_output,
)
from merging_methods.errors import UserError
from merging_methods.plan import MergePlan, TensorPlan, align_rows, build_plan
from merging_methods.primitives import mask_generator
from merging_methods.recipe import MergeRecipe
from merging_methods.record import write_model_card, write_record
from merging_methods.registry import MethodSpec, get_method, method_warnings

log = logging.getLogger(__name__)

# (tensor name, merged float32, base float32) -> final float32 tensor; used by inline AIM.
TensorHook = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
# Called after preflight with the opened inputs; returns the hook and what to record about it.
HookFactory = Callable[["OpenedInputs"], tuple[TensorHook, dict]]


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """'auto' -> cuda if available else cpu; a cuda request without CUDA is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag}: unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag}: {name} requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag}: {name} does not exist ({torch.cuda.device_count()} GPUs)")
    elif device.type != "cpu":
        raise UserError(f"{flag}: unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


@dataclass
class OpenedInputs:
    base: CheckpointReader
    models: list[CheckpointReader]
    plan: MergePlan
    out_dtype: torch.dtype


def open_inputs(recipe: MergeRecipe) -> OpenedInputs:
    """Resolve and open every checkpoint and plan the merge from headers only."""
    base = CheckpointReader(resolve_model_dir(recipe.base_model, "--base_model"), recipe.base_model)
    models = [CheckpointReader(resolve_model_dir(m, "--models_to_merge"), m)
              for m in recipe.models]
    out_dtype = parse_dtype(recipe.dtype) if recipe.dtype else base.stored_dtype
    return OpenedInputs(base, models, build_plan(base, models, out_dtype), out_dtype)


def _load(reader: CheckpointReader, name: str, device: torch.device,
          keep_dtype: bool = False) -> torch.Tensor:
    """One input tensor on `device`, as float32 unless `keep_dtype` (then as stored, if it is
    a float type); non-finite values are a UserError."""
    tensor = reader.get(name)
    wanted = tensor.dtype if keep_dtype and tensor.dtype.is_floating_point else torch.float32
    tensor = tensor.to(device=device, dtype=wanted)
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise UserError(f"{reader.label}: tensor {name} contains NaN or inf; the checkpoint is "
                        "corrupt or was saved in too narrow a dtype")
    return tensor


def merge_tensor(spec: MethodSpec, params: dict, seed: int, item: TensorPlan,
                 inputs: OpenedInputs, device: torch.device,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one planned tensor; returns (merged float32, base float32) on `device`.

    `out` is an optional float32 result buffer of the tensor's shape, reused across tensors
    (touching fresh memory is the dominant cost of cheap methods on CPU)."""
    base = _load(inputs.base, item.name, device)
    others = [_load(m, src, device, spec.stored_dtype_others)
              for m, src in zip(inputs.models, item.sources)]
    if item.is_vocab:
        others = [align_rows(t, base) for t in others]
    extra: dict = {}
    if spec.stochastic:
        extra["generators"] = [mask_generator(seed, i, item.name) for i in range(len(others))]
    if item.is_input_embedding:
        extra["is_input_embedding"] = True
    if out is not None:
        extra["out"] = out
    return spec.fn(base, others, **params, **extra), base


def run_merge(recipe: MergeRecipe, *, make_post: HookFactory | None = None) -> Path:
    """Execute `recipe` and return the output folder.

    `make_post` (inline AIM) is called once the inputs passed preflight; its hook transforms
    each merged tensor before it is cast and written.
    """
    spec = get_method(recipe.method)
    device = resolve_device(recipe.device)
    max_shard_bytes = parse_size(recipe.max_shard_size)
    inputs = open_inputs(recipe)
    for note in inputs.plan.notes + method_warnings(spec, recipe.params):
        log.warning(note)
    post, extra_record = make_post(inputs) if make_post else (None, {})
    save_path = Path(recipe.save_path)
    merged_count = copied_count = 0
    buffers: dict[tuple[int, ...], torch.Tensor] = {}   # one reusable result buffer per shape
    with staged_output(save_path, recipe.overwrite) as tmp:
        writer = ShardedWriter(tmp, inputs.plan.out_infos, max_shard_bytes)
        total = sum(t.out.nbytes for t in inputs.plan.tensors)
        with torch.inference_mode(), tqdm(total=total, unit="B", unit_scale=True,
                                          desc=f"merge {recipe.method}") as bar:
            for item in inputs.plan.tensors:
                if item.merge:
                    buffer = buffers.get(item.out.shape)
                    if buffer is None:
                        buffer = buffers[item.out.shape] = torch.empty(
                            item.out.shape, dtype=torch.float32, device=device)
                    merged, base = merge_tensor(spec, recipe.params, recipe.seed, item, inputs,
                                                device, buffer)
                    if post is not None:
                        merged = post(item.name, merged, base)
                    out = merged.to(item.out.dtype)
                    merged_count += 1
                else:
                    out = inputs.base.get(item.name)
                    copied_count += 1
                writer.add(item.name, out)
                bar.update(item.out.nbytes)
        writer.close()
        copy_model_files(inputs.base.folder, tmp,
                         config_updates=dtype_config_update(inputs.base.config, inputs.out_dtype))
        record = {"merge": recipe.as_record(), **extra_record}
        write_record(tmp, record)
        write_model_card(tmp, record)
    log.info("merged %d tensors, copied %d non-float tensors from the base -> %s",
             merged_count, copied_count, save_path)
    return save_path

