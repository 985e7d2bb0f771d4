"""run_merge: preflight -> per-unit merge loop -> sharded write -> side files.

This is the only code that loops over tensor names, chooses the device and dtypes, seeds
randomness and decides what happens to tensors that are not merged. A unit of work is one
whole tensor, merged by the method's dense function in float32, or, for a method with a
per-element fast path (registry.FastPath), a chunk of its rows (rows.py); a tensor above
rows.TWO_PASS_ELEMENTS (or its form's lower `hold_elements`) of a method with a two-pass form
(streamed.py) also goes in row chunks, after streaming passes that gather its whole-tensor
facts (on a thread of their own, ahead of the merge, which takes over those still queued when
it would wait: _FactsAhead; the largest such tensors are merged last, statistics_last). I/O
threads read the next unit and write earlier ones while the current one is merged (overlap.py;
the output past the page cache where the file system allows it). Peak memory is a few chunks
for per-element fast paths, a few chunks or tensors of TWO_PASS_ELEMENTS for two-pass methods,
and about (models + 2) x the largest tensor otherwise.
"""
from __future__ import annotations

import gc
import logging
import math
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from checkpoints.checkpoint import (
    MODEL_SIDE_FILES, CheckpointReader, ShardedWriter, TensorInfo, copy_model_files,
    dtype_config_update, dtype_name, finite, parse_dtype, parse_size, resolve_model_dir,
)
from checkpoints.device import resolve_device
from checkpoints.errors import UserError, writing
from checkpoints.output import check_output_path, staged_output
from checkpoints.overlap import IOThread
from checkpoints.record import write_model_card, write_record
from checkpoints.rows import AlignedRows, RowRange, row_ranges, too_large_to_hold
from merging_methods.passthrough import (LayerSlice, Source, heads_like, layout_update,
                                         passthrough_plan)
from merging_methods.plan import (MergePlan, TensorPlan, build_plan, input_embedding_rows,
                                  num_layers)
from merging_methods.primitives import (keep_mask, mask_generator, mask_key, native_keep_mul,
                                        used_density)
from merging_methods.recipe import MergeRecipe
from merging_methods.registry import MethodSpec, get_method, method_warnings, splits_by_rows
from merging_methods.sliced import SlicedInput
from merging_methods.streamed import AHEAD_ELEMENTS, RowSource
from merging_methods.token_vocab import (TokenRows, plan_token_rows, reindexes,
                                         save_chat_template)
from merging_methods.vocab import VocabUnion, plan_union, save_union_tokenizer, vocab_config_update
from merging_methods.yaml_recipe import (input_paths, is_sliced, open_sliced, record_of,
                                         tensor_arguments)

log = logging.getLogger(__name__)

# (tensor name, merged float32, base (float32 or stored dtype), their rows or None for all)
# -> final float32 tensor; used by inline AIM.
TensorHook = Callable[[str, torch.Tensor, torch.Tensor, "RowRange | None"], torch.Tensor]
# Called after preflight with the opened inputs; returns the hook and what to record about it.
HookFactory = Callable[["OpenedInputs"], tuple[TensorHook, dict]]


@dataclass
class OpenedInputs:
    base: CheckpointReader            # (a `slices:` config: sliced.SlicedInput views, named
    models: list[CheckpointReader]    #  like the output, of the checkpoints in `sources`)
    plan: MergePlan
    out_dtype: torch.dtype
    sources: list[CheckpointReader]   # every checkpoint read
    union: VocabUnion | None = None   # --vocab union: the added tokens and output rows
    layout: dict = field(default_factory=dict)   # config.json depth updates of a sliced merge
    tokens: TokenRows | None = None   # a config's tokenizer vocabulary: rows re-indexed by token


def open_inputs(recipe: MergeRecipe) -> OpenedInputs:
    """Resolve and open every checkpoint and plan the merge from headers (and, for
    `--vocab union` or a config's tokenizer vocabulary, tokenizers) only."""
    layout = {}
    if is_sliced(recipe):
        (base, *models), sources = open_sliced(recipe)
        layout = base.layout
        if (recipe.vocab == "union" or reindexes(recipe.config)) and any(
                m.mixes_models for m in (base, *models)):
            raise UserError(f"{recipe.config.origin}: a tokenizer that builds a new vocabulary "
                            "needs every slice to list the same models in the same order")
    else:
        base = CheckpointReader(resolve_model_dir(recipe.base_model, "--base_model"),
                                recipe.base_model)
        models = [CheckpointReader(resolve_model_dir(m, "--models_to_merge"), m)
                  for m in recipe.models]
        sources = [base, *models]
    out_dtype = parse_dtype(recipe.dtype) if recipe.dtype else base.stored_dtype
    union = None
    if recipe.vocab == "union":
        base_rows = input_embedding_rows(base)
        if base_rows is None:
            raise UserError(f"--vocab union: no input embedding found in {base.label}; use "
                            "--vocab base")
        union = plan_union(base.folder, base_rows,
                           [(m.label, m.folder, input_embedding_rows(m) or base_rows)
                            for m in models])
    tokens = plan_token_rows(recipe.config, base, models) if reindexes(recipe.config) else None
    rows = union.rows if union else tokens.rows if tokens else None
    plan = build_plan(base, models, out_dtype, rows, by_token=tokens is not None)
    return OpenedInputs(base, models, plan, out_dtype, sources, union, layout, tokens)


def _to_device(tensor: torch.Tensor, device: torch.device, keep_dtype: bool) -> torch.Tensor:
    """An input tensor on `device`, as float32 unless `keep_dtype` (then as stored, if it is
    a float type)."""
    wanted = tensor.dtype if keep_dtype and tensor.dtype.is_floating_point else torch.float32
    return tensor.to(device=device, dtype=wanted)


class ResultBuffer:
    """One float32 result buffer for every chunk, grown to the largest: reusing it avoids
    page-faulting fresh memory for each tensor, the dominant cost of cheap methods on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self._flat: torch.Tensor | None = None

    def view(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        if self._flat is None or self._flat.numel() < numel:
            self._flat = None   # free the old buffer before allocating the larger one
            self._flat = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._flat[:numel].view(shape)


def tensor_context(spec: MethodSpec, item: TensorPlan, seed: int, n_models: int,
                   num_layers: int | None) -> dict:
    """The per-tensor keyword arguments `spec.context` asks for (registry.py's contract)."""
    facts = {"tensor_name": item.name, "layer_index": item.layer_index, "num_layers": num_layers,
             "is_input_embedding": item.is_input_embedding}
    if "generators" in spec.context:
        facts["generators"] = [mask_generator(seed, i, item.name) for i in range(n_models)]
    if "mask_keys" in spec.context:
        facts["mask_keys"] = [mask_key(seed, i, item.name) for i in range(n_models)]
    return {name: facts[name] for name in spec.context}


class _LastRows:
    """A tensor's rows with the last chunk read kept: the models' deltas, streamed in lockstep
    (primitives.l1_factors), ask for the same base rows in turn, read once this way."""

    def __init__(self, source: AlignedRows):
        self.source = source
        self._last: tuple[RowRange, torch.Tensor] | None = None

    def get(self, rows: RowRange) -> torch.Tensor:
        if self._last is None or self._last[0] != rows:
            self._last = None   # free the old chunk before reading the next
            self._last = rows, self.source.get(rows)
        return self._last[1]


class TensorMerge:
    """Merging one planned tensor: whole, through the method's dense function, or chunk of rows
    by chunk through its fast path (rows.py); DARE's masks are keyed by the flat element index,
    so the chunks' masks are those of the whole tensor."""

    def __init__(self, spec: MethodSpec, params: dict, seed: int, item: TensorPlan,
                 inputs: OpenedInputs, device: torch.device, scratch: Path | None = None):
        self.spec, self.params, self.item, self.inputs = spec, params, item, inputs
        self.scratch = scratch   # the folder for a two-pass form's scratch files (staging)
        fill = "mean" if inputs.union else "base"

        def aligned(reader: CheckpointReader, source: str) -> AlignedRows:
            own = reader.info[source].shape[0] if item.is_vocab else None
            return AlignedRows(reader, source, own, fill)

        self.base = aligned(inputs.base, item.name)
        self.models = [aligned(m, src) for m, src in zip(inputs.models, item.sources)]
        self.context = tensor_context(spec, item, seed, len(self.models), inputs.plan.num_layers)
        # re-indexing by token reads whole tensors: one chunk
        self.tokens = inputs.tokens if item.is_vocab else None
        # DARE on row chunks on CPU: the chunk's keep-masks are drawn with its inputs on the I/O
        # thread, off the merge thread, by numpy; an accelerator, or the compiled kernel (one
        # pass that draws and applies: faster than a drawn mask's multiply, and no mask held),
        # draws them in the merge, block by block
        self.masks_ahead = (device.type == "cpu" and spec.fast is not None
                            and spec.fast.dare_masks and splits_by_rows(spec, params)
                            and native_keep_mul() is None)
        # too large to hold whole for a method that needs whole-tensor facts: its two-pass form
        # gathers them from the row chunks at the first chunk (streamed.py)
        whole = (spec.two_pass is None or splits_by_rows(spec, params) or self.tokens is not None
                 or not too_large_to_hold(item.out.shape, spec.two_pass.hold_elements))
        self.two_pass = None if whole else spec.two_pass
        self.device = device
        self._facts: Future | None = None

    def units(self) -> Iterator[tuple[RowRange | None, tuple[int, ...]]]:
        """(rows, output shape of those rows) for each chunk this tensor is merged in."""
        shape = self.item.out.shape
        split = ((splits_by_rows(self.spec, self.params) or self.two_pass is not None)
                 and self.tokens is None)
        for rows in row_ranges(shape, split):
            yield rows, shape if rows is None else (rows[1] - rows[0], *shape[1:])

    def read(self, rows: RowRange | None) -> list:
        """The stored rows of the base and of every model (vocab rows fitted, checked finite on
        the I/O thread), base first, then (DARE on row chunks) the models' keep-masks for these rows."""
        name = self.item.name
        if self.tokens is not None:
            inputs = [self.base, *self.models]
            raw = self.tokens.align([finite(a.reader.get(a.name), a.reader.label, name)
                                     for a in inputs], [a.reader.label for a in inputs])
        else:
            base_rows = finite(self.base.get(rows), self.inputs.base.label, name)
            raw = [base_rows, *(finite(m.get(rows, base_rows), m.reader.label, name)
                                for m in self.models)]
        if self.masks_ahead:
            p, n = self.params, raw[0].numel()
            start = rows[0] * math.prod(raw[0].shape[1:]) if rows else 0  # flat offset
            raw.append([keep_mask(k, d, start, n) if used_density(d) < 1 and w != 0 else None
                        for d, w, k in zip(p["density"], p["weights"], self.context["mask_keys"])])
        return raw

    def merge(self, raw: list[torch.Tensor], device: torch.device, rows: RowRange | None = None,
              out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge what `read(rows)` returned (emptied here, so each stored copy is freed as soon
        as it is converted); returns (merged float32, base) on `device`, base in its stored
        dtype for a fast path or two-pass form that takes it so. `out` is an optional float32
        result buffer of the rows' shape, which a fast path or two-pass form writes into."""
        fast = self.spec.fast
        keep = (fast is not None and fast.stored_dtype_inputs) or self.two_pass is not None
        base = _to_device(raw.pop(0), device, keep)
        others = [_to_device(raw.pop(0), device, keep) for _ in self.models]
        if self.two_pass is not None:
            return self._merge_two_pass(base, others, rows, out), base
        if fast is None:
            return self.spec.fn(base, others, **self.params, **self.context), base
        extra = {}
        if self.masks_ahead:
            extra["keep_masks"] = raw.pop()
        elif fast.dare_masks and rows is not None:   # masks drawn in fn: at the chunk's offset
            extra["mask_offset"] = rows[0] * math.prod(self.item.out.shape[1:])
        return fast.fn(base, others, **self.params, **self.context, **extra, out=out), base

    def start_facts(self, submit: Callable[[Callable[[], object]], Future]) -> None:
        """Have `submit` (a thread's queue) gather the two-pass form's whole-tensor facts, once:
        the runner starts them while the tensor before this one is merged."""
        if self._facts is None:
            self._facts = submit(self._gather_facts)

    def facts_pending(self) -> bool:
        """Whether the facts are started and not ready yet."""
        return self._facts is not None and not self._facts.done()

    def gather_queued_facts(self) -> bool:
        """Gather the facts here, on the calling thread, if they are still queued for the thread
        for work ahead (not started there); whether it did."""
        if self._facts is None or not self._facts.cancel():
            return False
        self._facts = _run_now(self._gather_facts)
        return True

    def _gather_facts(self) -> object:
        shape, device, base = self.item.out.shape, self.device, _LastRows(self.base)
        source = RowSource(shape, tuple(row_ranges(shape, True)),
                           partial(self._read_model, device=device, base=base),
                           partial(self._read_models, device=device, base=base), device,
                           len(self.models), self.scratch)
        return self.two_pass.stats(source, **self.params, **self.context)

    def _merge_two_pass(self, base: torch.Tensor, others: list[torch.Tensor], rows: RowRange,
                        out: torch.Tensor | None) -> torch.Tensor:
        """The chunk `rows` merged by the two-pass form with its whole-tensor facts (gathered
        here at the first chunk unless started ahead), dropped after the last chunk (chunks
        come in row order)."""
        shape = self.item.out.shape
        self.start_facts(_run_now)
        merged = self.two_pass.apply(self._facts.result(), rows[0] * math.prod(shape[1:]), base,
                                     others, **self.params, **self.context, out=out)
        if rows[1] == shape[0]:
            self._facts = None
        return merged

    def _read_model(self, rows: RowRange, i: int, device: torch.device, base: _LastRows
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(base rows, model i's rows) for a streaming pass, as `_read_models` reads them."""
        base_rows, (other,) = self._read_models(rows, device, base, i)
        return base_rows, other

    def _read_models(self, rows: RowRange, device: torch.device, base: _LastRows,
                     only: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(base rows, every model's rows, or model `only`'s) for a streaming pass, the base
        read through `base`: fitted, stored dtype, on `device`. Not checked finite here: the
        merge reads every chunk again through `read`, which is, before anything is written."""
        base_rows = base.get(rows)
        models = self.models if only is None else [self.models[only]]
        others = [_to_device(m.get(rows, base_rows), device, True) for m in models]
        return _to_device(base_rows, device, True), others


def _run_now(work: Callable[[], object]) -> Future:
    """`work` run on this thread, as a finished Future."""
    future: Future = Future()
    future.set_result(work())
    return future


@dataclass(frozen=True)
class WorkUnit:
    """Rows of one output tensor: merged by `job`, or copied from the base when job is None."""

    name: str
    rows: RowRange | None
    shape: tuple[int, ...]
    job: TensorMerge | None
    nbytes: int   # the stored inputs read for it (the prefetch budget)


def _work_units(spec: MethodSpec, recipe: MergeRecipe, inputs: OpenedInputs,
                device: torch.device, scratch: Path | None = None) -> list[WorkUnit]:
    units = []
    arguments = tensor_arguments(recipe, {r.label: num_layers(r.config) or 0
                                          for r in inputs.sources})
    for item in inputs.plan.tensors:
        if not item.merge:
            units.append(WorkUnit(item.name, None, item.out.shape, None, item.out.nbytes))
            continue
        job = TensorMerge(spec, arguments(item.name), recipe.seed, item, inputs, device, scratch)
        readers = [(inputs.base, item.name), *zip(inputs.models, item.sources)]
        itemsizes = sum(reader.info[name].dtype.itemsize for reader, name in readers)
        units += [WorkUnit(item.name, rows, shape, job, math.prod(shape) * itemsizes)
                  for rows, shape in job.units()]
    return statistics_last(units)


def statistics_last(units: list[WorkUnit]) -> list[WorkUnit]:
    """`units` with those of the two-pass tensors above AHEAD_ELEMENTS / 2 moved to the end (the
    writer takes tensors in any order). Their statistics take longest: an input embedding first
    in the plan left the merge waiting for them (0.27 s of a 3.4 s DARE-l1 merge of the 542M
    family); placed last, they are gathered while the other tensors are merged."""
    def large(unit: WorkUnit) -> bool:
        return (unit.job is not None and unit.job.two_pass is not None
                and unit.job.item.out.numel > AHEAD_ELEMENTS // 2)
    return [u for u in units if not large(u)] + [u for u in units if large(u)]


class _FactsAhead:
    """Starts the whole-tensor facts of two-pass tensors ahead of the merge, in order, on the
    thread for work ahead: from the tensor being merged on, as many as fit in their form's
    `ahead` entries (at least the next one), so that the statistics passes keep ahead of the
    merge across tensors of any size. The facts of the tensors started are alive together
    (small: thresholds, norms, DARE's packed masks). Where the statistics cost more than the
    merge (FR's spectra), the merge's thread gathers the queued ones while it would wait:
    free_merging on the 542M family 38.4 -> 31.8 s; DARE and TIES as fast as before."""

    def __init__(self, units: list[WorkUnit], submit: Callable[[Callable[[], object]], Future]):
        self.jobs = list(dict.fromkeys(u.job for u in units
                                       if u.job and u.job.two_pass and u.job.two_pass.ahead))
        self.order = {job: index for index, job in enumerate(self.jobs)}
        self.submit = submit
        self._started = 0   # jobs[:_started] have their facts started
        self._fill(0)

    def _fill(self, current: int) -> None:
        """Start facts from job `current` on while the jobs started and not yet merged hold
        fewer entries than the next one's form allows ahead, and at least the one after
        `current`."""
        def held() -> int:
            return sum(self.jobs[k].item.out.numel for k in range(current, self._started))
        while self._started < len(self.jobs) and (
                self._started <= current + 1 or held() < self.jobs[self._started].two_pass.ahead):
            self.jobs[self._started].start_facts(self.submit)
            self._started += 1

    def reached(self, unit: WorkUnit) -> None:
        """The merge is about to take `unit`: start the facts ahead, and while the unit's own
        are not ready, gather the first queued ones (its own, or the next tensors') on this
        thread instead of waiting, so that the merge does not wait on a thread for work ahead
        that has more statistics to gather than the merge has chunks to merge."""
        if unit.job in self.order and unit.rows[0] == 0:
            current = self.order[unit.job]
            self._fill(current)
            while unit.job.facts_pending() and any(
                    job.gather_queued_facts() for job in self.jobs[current:self._started]):
                pass


def _read_unit(base: CheckpointReader, unit: WorkUnit):
    """The stored inputs of a unit (runs on the I/O thread)."""
    return unit.job.read(unit.rows) if unit.job else base.get(unit.name)


def _merge_unit(unit: WorkUnit, raw: list[torch.Tensor], device: torch.device,
                results: ResultBuffer, post: TensorHook | None) -> torch.Tensor:
    """The unit's rows merged, passed through `post` and cast to the output dtype (a tensor of
    its own: the result buffer is reused by the next unit while this one is being written)."""
    buffer = results.view(unit.shape) if unit.job.spec.fast or unit.job.two_pass else None
    merged, base = unit.job.merge(raw, device, unit.rows, buffer)
    if post is not None:
        merged = post(unit.name, merged, base, unit.rows)
    out = merged.to(unit.job.item.out.dtype)
    return out.clone() if buffer is not None and out.data_ptr() == buffer.data_ptr() else out


@contextmanager
def _imports_left_to_refcounting() -> Iterator[None]:
    """The objects alive at the start (torch's and the other imports', ~170K) are left out of
    the garbage collector's passes while the merge runs (gc.freeze): its collections walked them
    all, ~0.1 s of a 3.4 s DARE merge of the 542M family."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_merge(recipe: MergeRecipe, *, make_post: HookFactory | None = None) -> Path:
    """Execute `recipe` and return the output folder.

    `make_post` (inline AIM) is called once the inputs passed preflight; its hook transforms
    each merged tensor before it is cast and written.
    """
    spec = get_method(recipe.method)
    check_output_path(recipe.save_path, recipe.overwrite, input_paths(recipe))
    if spec.stacks_layers:
        if make_post is not None:
            raise UserError(f"--aim: {spec.name} has no base to relax toward (its layers are "
                            "copied from slices of the models); drop --aim")
        if reindexes(recipe.config):
            raise UserError(f"{recipe.config.origin}: tokenizer_source: {spec.name} copies "
                            "layers as they are; use tokenizer_source: base (or none)")
        return run_stacked(recipe, spec)
    device = resolve_device(recipe.device)
    max_shard_bytes = parse_size(recipe.max_shard_size)
    inputs = open_inputs(recipe)
    union_notes = list(inputs.union.notes) if inputs.union else []
    # (a config's values vary by tensor; its warnings would be per tensor)
    warnings = method_warnings(spec, recipe.params) if recipe.config is None else []
    for note in inputs.plan.notes + union_notes + warnings:
        log.warning(note)
    if make_post is not None and isinstance(inputs.base, SlicedInput) and inputs.base.moves_layers:
        raise UserError("--aim: the slices move the base's layers, so the base's activation "
                        "statistics do not match the output's layers; drop --aim")
    post, extra_record = make_post(inputs) if make_post else (None, {})
    save_path = Path(recipe.save_path)
    results = ResultBuffer(device)
    folders = [r.folder for r in inputs.sources]
    with staged_output(save_path, recipe.overwrite, folders) as tmp:
        writer = ShardedWriter(tmp, inputs.plan.out_infos, max_shard_bytes, direct=True)
        total = sum(t.out.nbytes for t in inputs.plan.tensors)
        with torch.inference_mode(), _imports_left_to_refcounting(), IOThread() as io, tqdm(
                total=total, unit="B", unit_scale=True, desc=f"merge {recipe.method}") as bar:
            units = _work_units(spec, recipe, inputs, device, tmp)
            loads = ((partial(_read_unit, inputs.base, unit), unit.nbytes) for unit in units)
            facts_ahead = _FactsAhead(units, io.ahead)
            for unit, raw in zip(units, io.prefetch(loads)):
                facts_ahead.reached(unit)
                out = raw if unit.job is None else _merge_unit(unit, raw, device, results, post)
                nbytes = out.numel() * out.element_size()
                io.write(partial(writer.add, unit.name, out, unit.rows[0] if unit.rows else 0),
                         nbytes)
                bar.update(nbytes)
            io.flush()
        writer.close()
        config_updates = {**dtype_config_update(inputs.base.config, inputs.out_dtype),
                          **inputs.layout}
        if inputs.union or inputs.tokens:
            rows = (inputs.union or inputs.tokens).rows
            config_updates.update(vocab_config_update(inputs.base.config, rows))
        side_files = ("config.json", "generation_config.json") if inputs.tokens else MODEL_SIDE_FILES
        copy_model_files(inputs.base.folder, tmp, names=side_files, config_updates=config_updates)
        if inputs.tokens:
            with writing(tmp / "tokenizer.json"):
                inputs.tokens.tokenizer.save_pretrained(tmp)
        if inputs.union and inputs.union.tokens:
            save_union_tokenizer(inputs.base.folder, inputs.union, tmp)
        if recipe.config is not None and recipe.config.chat_template:
            save_chat_template(tmp, recipe.config.chat_template, folders)
        moved = isinstance(inputs.base, SlicedInput) and inputs.base.moves_layers
        record = record_of(recipe, extra_record, dtype_name(inputs.out_dtype), moved)
        write_record(tmp, record)
        write_model_card(tmp, record)
    merged_count = sum(t.merge for t in inputs.plan.tensors)
    log.info("merged %d tensors, copied %d non-float tensors from the base -> %s",
             merged_count, len(inputs.plan.tensors) - merged_count, save_path)
    return save_path



# ------------------------------------------------------------------------------- passthrough
def _stacked_arguments(recipe: MergeRecipe,
                       depths: dict[str, int]) -> Callable[[str, Source], dict]:
    """(output name, its source) -> passthrough's keywords: the source slice's --scale, or the
    scale a config resolves for that tensor."""
    if recipe.config is None:
        scales = recipe.params["scale"]
        return lambda _name, source: {"scale": [scales[source.model]]}
    at = tensor_arguments(recipe, depths)
    return lambda name, _source: at(name)


def _stacked_config(donor: CheckpointReader, readers: list[CheckpointReader],
                    slices: list[LayerSlice], out_dtype: torch.dtype) -> dict:
    """config.json updates: the output depth, per-layer lists (`layer_types`) taken from the
    slices' models, the output dtype."""
    return {**dtype_config_update(donor.config, out_dtype),
            **layout_update(donor.config, [r.config for r in readers], slices)}


def run_stacked(recipe: MergeRecipe, spec: MethodSpec) -> Path:
    """Passthrough (§7): copy the layer ranges of `recipe.layer_ranges` (one per model) into one
    model, renumbered, each tensor times its scale."""
    donor = CheckpointReader(resolve_model_dir(recipe.base_model, "--base_model"),
                             recipe.base_model)
    readers = [CheckpointReader(resolve_model_dir(m, "--models_to_merge"), m)
               for m in recipe.models]
    slices = [LayerSlice(i, a, b) for i, (a, b) in enumerate(recipe.layer_ranges)]
    depths = [num_layers(r.config) or 0 for r in readers]
    plan = heads_like(passthrough_plan(slices, [list(r.info) for r in readers], depths),
                             donor, readers)
    arguments = _stacked_arguments(recipe, {r.label: num_layers(r.config) or 0
                                            for r in (donor, *readers)})
    out_dtype = parse_dtype(recipe.dtype) if recipe.dtype else donor.stored_dtype

    def out_info(source: Source) -> TensorInfo:
        info = readers[source.model].info[source.name]
        return TensorInfo(info.shape, out_dtype if info.dtype.is_floating_point else info.dtype)

    infos = {name: out_info(source) for name, source in plan.sources.items()}
    save_path = Path(recipe.save_path)
    folders = [donor.folder, *(r.folder for r in readers)]
    with staged_output(save_path, recipe.overwrite, folders) as tmp, torch.inference_mode():
        writer = ShardedWriter(tmp, infos, parse_size(recipe.max_shard_size))
        for name, source in tqdm(plan.sources.items(), desc=f"{spec.name}", unit="tensor"):
            reader = readers[source.model]
            for rows in row_ranges(reader.info[source.name].shape, split=True):  # per element
                tensor = finite(reader.get(source.name, rows), reader.label, source.name)
                if tensor.dtype.is_floating_point:
                    tensor = spec.fn(tensor, [tensor], **arguments(name, source)).to(out_dtype)
                writer.add(name, tensor, rows[0] if rows else 0)
        writer.close()
        copy_model_files(donor.folder, tmp, config_updates=_stacked_config(
            donor, readers, slices, out_dtype))
        if recipe.config is not None and recipe.config.chat_template:
            save_chat_template(tmp, recipe.config.chat_template, folders)
        record = record_of(recipe, {}, layers_moved=True)   # stacked: there is no base
        write_record(tmp, record)
        write_model_card(tmp, record)
    log.info("stacked %d layers from %d slices -> %s", plan.num_hidden_layers, len(slices),
             save_path)
    return save_path
