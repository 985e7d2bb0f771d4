"""Large tensors in two passes (merging_methods/streamed.py): whole-tensor facts gathered from
row chunks, then the merge chunk by chunk; the same bits as the whole-tensor path, in memory
bounded by the chunk size."""
from __future__ import annotations

import dataclasses
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge
from checkpoints import rows
from checkpoints.checkpoint import CheckpointReader
from merging_methods import arcee_fusion, della, model_stock, primitives, runner
from merging_methods.primitives import Deltas, TopK
from merging_methods.registry import METHODS
from merging_methods.streamed import StreamedDeltas, held_source
from tests.test_merge_cli import assert_user_error, family, load_weights  # noqa: F401 - fixture
from tests.test_methods import context, resolved
from tests.tiny_models import build_finetune

SHAPE = (13, 7)
GTA = {"weights": [1.0, 0.5, -0.7], "density": [0.3, 0.5, 0.45]}
# each two-pass method with the settings that need it (DARE: only the whole-tensor l1 rescale)
SETTINGS = [("ties", GTA), ("ties", {**GTA, "rescale": True}),
            ("ties", {**GTA, "density": [1e-4, 0.5, 0.2], "mergekit_trim": True}),  # k = 1
            ("dare_ties", {**GTA, "rescale_mode": "l1"}),
            ("dare_linear", {**GTA, "rescale_mode": "l1"}),
            ("breadcrumbs", {**GTA, "gamma": [0.1, 0.05, 0.2]}),
            ("breadcrumbs_ties", {**GTA, "gamma": [0.1, 0.05, 0.2], "rescale": True}),
            ("della", {**GTA, "epsilon": [0.1, 0.2, 0.05]}),
            ("della_linear", {**GTA, "epsilon": [0.1, 0.2, 0.05], "rescale_mode": "inverse_prob"}),
            ("della_linear", {**GTA, "density": [0.3, 1.0, 0.5], "epsilon": [0.1, 0.2, 0.05]}),
            ("slerp", {"t": 0.3}), ("model_stock", {}), ("model_stock", {"filter_wise": True}),
            ("nuslerp", {"weights": [0.3, 0.9]}),
            ("nuslerp", {"weights": [0.3, 0.9], "nuslerp_flatten": False}),
            ("nuslerp", {"weights": [0.3, 0.9], "nuslerp_flatten": False,
                         "nuslerp_row_wise": True, "task_vectors": False}),
            ("multislerp", {"weights": [0.5, 1.0, 0.7]}),
            ("multislerp", {"weights": [0.5, 1.0, 0.7], "normalize_weights": False,
                            "task_vectors": False}),
            ("karcher", {}), ("karcher", {"max_iter": 3, "tol": 1e-3}),
            ("fr_merging", {"weights": GTA["weights"], "fr_ratio": 0.5}),
            ("fr_merging", {"weights": GTA["weights"], "fr_faithful": True, "normalize": True}),
            ("free_merging", {"weights": GTA["weights"], "task_model": 1, "expert_density": 0.3,
                              "fr_ratio": 0.5}),
            ("sce", {"select_topk": 0.7}), ("sce", {}), ("arcee_fusion", {}),
            ("ramplus_tl", {"ram_epsilon": 1.5, "ramplus_r": 0.5, "ramplus_alpha": 3.0})]


def tied_inputs(dtype: torch.dtype, n_models: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Integer-valued base and models: |delta| in 0..4, so long runs of ties sit at every top-k
    threshold."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, SHAPE, generator=g).to(dtype)
    others = [(base.float() + torch.randint(-4, 5, SHAPE, generator=g)).to(dtype)
              for _ in range(n_models)]
    return base, others


@pytest.mark.parametrize("step", [1, 4])
def test_streamed_deltas_are_the_blocks_of_deltas(monkeypatch, step):
    """Blocks of 5 elements over chunks of 7 or 28: blocks span chunks, and still equal the
    whole tensor's blocks (bf16 model minus fp32 base)."""
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", step * SHAPE[1])
    base, others = tied_inputs(torch.bfloat16)
    base = base.float() + 0.25
    got = [(s, b.clone()) for s, b in StreamedDeltas(held_source(base, others), 1, 5)]
    want = [(s, b.clone()) for s, b in Deltas(base, others[1], 5)]
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(0, 91, 5))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))


def assert_two_pass_is_whole(monkeypatch, method: str, settings: dict, dtype: torch.dtype,
                             device: str = "cpu", **facts) -> None:
    """Chunks of 1 and 5 rows, blocks of 8 elements (so blocks span chunks): the chunks merged
    with the streamed statistics are the dense function's result on the whole tensor."""
    monkeypatch.setattr(primitives, "CPU_BLOCK", 8)
    monkeypatch.setattr(primitives, "ACCELERATOR_BLOCK", 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    spec = METHODS[method]
    base, others = tied_inputs(dtype, spec.others[1] or 3)
    base, others = base.to(device), [o.to(device) for o in others]
    params = resolved(method, len(others), **settings)
    for step in (1, 5):
        monkeypatch.setattr(rows, "CHUNK_ELEMENTS", step * SHAPE[1])
        want = spec.fn(base.float(), [o.float() for o in others], **params,
                       **context(method, len(others), **facts))
        ctx = context(method, len(others), **facts)   # DELLA: generators in their first state
        source = held_source(base, others)
        stats = spec.two_pass.stats(source, **params, **ctx)
        if method == "ties":   # the threshold splits a run of ties: where it ends matters
            assert all(0 < f.cut.keep_equal < f.cut.equal for f, _ in stats.values()
                       if isinstance(f, TopK))
        if method == "sce" and settings.get("select_topk", 1) < 1:   # so does sce's σ² cut
            assert 0 < stats[1].cut.keep_equal < stats[1].cut.equal
        got = torch.cat([spec.two_pass.apply(stats, a * SHAPE[1], base[a:b],
                                             [o[a:b] for o in others], **params, **ctx).clone()
                         for a, b in source.chunks])
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("method,settings", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_equals_the_whole_tensor_bit_for_bit(monkeypatch, method, settings, dtype):
    assert_two_pass_is_whole(monkeypatch, method, settings, dtype)


@pytest.mark.parametrize("method,settings", [s for s in SETTINGS if s[0].startswith("della")])
def test_della_draws_rows_in_small_groups_with_the_same_bits(monkeypatch, method, settings):
    """Masks drawn 2 rows at a time (groups that straddle the 5-row chunks) are the whole draw."""
    monkeypatch.setattr(della, "DRAW_ELEMENTS", 2 * SHAPE[1] + 1)
    assert_two_pass_is_whole(monkeypatch, method, settings, torch.bfloat16)


@pytest.mark.parametrize("settings", [{}, {"filter_wise": True}])
def test_model_stock_in_pieces_inside_chunks(monkeypatch, settings):
    """Pieces of 2 rows or 15 elements inside the chunks: both forms still agree bit for bit."""
    monkeypatch.setattr(model_stock, "PIECE", 2 * SHAPE[1] + 1)
    assert_two_pass_is_whole(monkeypatch, "model_stock", settings, torch.bfloat16)


def test_arcee_fusion_sample_is_gathered_chunk_by_chunk(monkeypatch):
    """A 40-entry sample of the 91 (mergekit's rule, scaled down): the draws gathered from the
    chunks in position order give the whole tensor's threshold, bit for bit."""
    monkeypatch.setattr(arcee_fusion, "SAMPLE_SIZE", 40)
    assert_two_pass_is_whole(monkeypatch, "arcee_fusion", {"arcee_fusion_sample": "mergekit"},
                             torch.bfloat16)


@pytest.mark.parametrize("is_input_embedding", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_widen_two_pass_equals_the_whole_tensor(monkeypatch, is_input_embedding, dtype):
    """Per-column units, and per-row units (the input embedding, transposed)."""
    assert_two_pass_is_whole(monkeypatch, "widen", {"above_average_value_ratio": 0.9}, dtype,
                             is_input_embedding=is_input_embedding)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,settings",
                         [s for s in SETTINGS if s[0] in ("ties", "della", "model_stock", "sce",
                                                          "arcee_fusion", "ramplus_tl",
                                                          "free_merging")])
def test_two_pass_on_cuda_equals_the_whole_tensor(monkeypatch, method, settings):
    assert_two_pass_is_whole(monkeypatch, method, settings, torch.bfloat16, "cuda")


def recorded_reads(monkeypatch) -> list[int]:
    """Element counts of every tensor read from a checkpoint and every result buffer used."""
    sizes: list[int] = []
    read, view = CheckpointReader.get, runner.ResultBuffer.view

    def get(self, name, rows=None):
        tensor = read(self, name, rows)
        sizes.append(tensor.numel())
        return tensor

    def buffer_view(self, shape):
        out = view(self, shape)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(CheckpointReader, "get", get)
    monkeypatch.setattr(runner.ResultBuffer, "view", buffer_view)
    return sizes


@pytest.mark.parametrize("method,extra", [
    ("ties", ["--density", "0.3"]),
    ("dare_ties", ["--density", "0.5", "--rescale_mode", "l1"]),
    ("della", ["--density", "0.5", "--epsilon", "0.1"]),
    ("slerp", ["--t", "0.3"]), ("model_stock", ["--filter_wise"]), ("widen", []),
    ("nuslerp", ["--weights", "0.3,0.9"]),
    ("nuslerp", ["--weights", "0.3,0.9", "--no-nuslerp_flatten", "--nuslerp_row_wise"]),
    ("multislerp", ["--weights", "0.5,1.0,0.7"]), ("karcher", []),
    ("fr_merging", ["--fr_ratio", "0.5"]),
    ("sce", ["--select_topk", "0.5"]), ("arcee_fusion", []), ("ramplus_tl", [])])
def test_runner_holds_no_more_than_a_chunk(family, monkeypatch, tmp_path, method,  # noqa: F811
                                           extra):
    """Every tensor above a 64-element budget goes in two passes: no read and no result buffer
    holds more than 64 elements (one row of the widest matrix), and the output is the
    whole-tensor merge's, bit for bit."""
    base, fts = family
    models = fts[:METHODS[method].others[1] or len(fts)]
    args = ["--method", method, "--base_model", str(base), "--models_to_merge",
            ",".join(map(str, models)), *extra]
    # the same chunks and 64-element blocks for both runs: slerp, model_stock and sce sum over
    # the chunks, WIDEN's statistics and the l1 factors over the blocks
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(primitives, "CPU_BLOCK", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert_chunked_is_whole(monkeypatch, tmp_path, args, "TWO_PASS_ELEMENTS")


def test_free_merging_streams_its_scratch_in_the_staging_folder(family, monkeypatch,  # noqa: F811
                                                               tmp_path):
    """free_merging (fr_merging's filtered spectra in scratch files, the expert's top-k) within
    the 64-element budget, bit for bit; every scratch file is made in the merge's staging
    folder, and nothing is left beside the outputs."""
    base, fts = family
    args = ["--method", "free_merging", "--base_model", str(base), "--models_to_merge",
            ",".join(map(str, fts)), "--free_task_model", str(fts[1]),
            "--free_expert_density", "0.1"]
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(primitives, "CPU_BLOCK", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    folders, make = [], tempfile.TemporaryFile

    def scratch_file(dir=None):  # noqa: A002 - tempfile's keyword
        folders.append(Path(dir))
        return make(dir=dir)
    monkeypatch.setattr(tempfile, "TemporaryFile", scratch_file)
    assert_chunked_is_whole(monkeypatch, tmp_path, args, "TWO_PASS_ELEMENTS")
    assert folders and {f.parent for f in folders} == {tmp_path}
    assert all(f.name.startswith(".chunked.partial-") for f in folders)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunked", "whole"]


@pytest.mark.parametrize("method,extra", [
    ("fr_merging", ["--fr_ratio", "0.5"]),
    ("free_merging", ["--free_task_model", "FT1", "--free_expert_density", "0.1"]),
    ("della_linear", ["--density", "0.5", "--epsilon", "0.1"]), ("karcher", [])])
def test_a_form_streams_matrices_below_the_common_bound(family, monkeypatch,  # noqa: F811
                                                        tmp_path, method, extra):
    """A form's own `hold_elements` sends smaller matrices through its two passes than
    rows.TWO_PASS_ELEMENTS, which stays as it is: with the form's bound lowered to 64 entries
    no read or result buffer holds more than 64 elements, and the bits are the held merge's."""
    base, fts = family
    args = ["--method", method, "--base_model", str(base), "--models_to_merge",
            ",".join(map(str, fts)), *(str(fts[1]) if a == "FT1" else a for a in extra)]
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(primitives, "CPU_BLOCK", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    spec = METHODS[method]
    form = dataclasses.replace(spec.two_pass, hold_elements=64)
    assert_chunked_is_whole(monkeypatch, tmp_path, args, lambda: monkeypatch.setitem(
        METHODS, method, dataclasses.replace(spec, two_pass=form)))


@pytest.mark.parametrize("shape,most,held", [
    ((4, 16), None, True), ((4, 17), None, False), ((65,), None, True),
    ((4, 8), 32, True), ((4, 9), 32, False), ((4, 17), 100, False), ((65,), 8, True)])
def test_too_large_to_hold_takes_the_lower_bound(monkeypatch, shape, most, held):
    """A matrix is streamed above rows.TWO_PASS_ELEMENTS, or above a form's lower bound; a
    1-D tensor never is."""
    monkeypatch.setattr(rows, "TWO_PASS_ELEMENTS", 64)
    assert rows.too_large_to_hold(shape, most) is not held


def assert_chunked_is_whole(monkeypatch, tmp_path, args: list[str],
                            shrink: str | Callable[[], None]) -> None:
    """merge.py `args` run as they are, then with a bound lowered to 64 elements (`shrink`: the
    name of a checkpoints.rows bound, or a function that lowers one) and every read and result
    buffer recorded: none holds more than 64 elements (one row of the widest matrix) and the
    output has the first run's bits."""
    assert merge.main([*args, "--save_path", str(tmp_path / "whole")]) == 0
    if callable(shrink):
        shrink()
    else:
        monkeypatch.setattr(rows, shrink, 64)
    sizes = recorded_reads(monkeypatch)
    assert merge.main([*args, "--save_path", str(tmp_path / "chunked")]) == 0
    assert max(sizes) == 64 and len(sizes) > 100
    got, want = load_weights(tmp_path / "chunked"), load_weights(tmp_path / "whole")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_row_chunks_whose_masks_are_drawn_in_the_merge_get_the_whole_tensors_masks(
        family, monkeypatch, tmp_path, method):  # noqa: F811
    """DARE row chunks with no masks drawn ahead (as on an accelerator) draw each chunk's masks
    at its flat offset: 64-element chunks give the whole-tensor merge's bits."""
    base, fts = family
    args = ["--method", method, "--base_model", str(base), "--models_to_merge",
            ",".join(map(str, fts)), "--density", "0.3,0.6,0.9", "--seed", "5"]
    construct = runner.TensorMerge.__init__

    def no_masks_ahead(self, *a, **k):
        construct(self, *a, **k)
        self.masks_ahead = False
    monkeypatch.setattr(runner.TensorMerge, "__init__", no_masks_ahead)
    monkeypatch.setattr(primitives, "CPU_BLOCK", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert_chunked_is_whole(monkeypatch, tmp_path, args, "CHUNK_ELEMENTS")


def test_a_nan_in_a_streamed_tensor_is_reported(family, monkeypatch, tmp_path, capsys):  # noqa: F811
    """The streaming passes do not check finiteness; the merge pass does, before any output."""
    base, _ = family
    nan_dir = build_finetune(base, tmp_path / "nan", seed=9)
    weights = load_file(nan_dir / "model.safetensors")
    name = next(n for n in weights if n.endswith("embed_tokens.weight"))
    weights[name][-1, 3] = float("nan")   # in the last chunk: found after the stats passes
    save_file(weights, nan_dir / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(rows, "TWO_PASS_ELEMENTS", 64)
    code = merge.main(["--method", "ties", "--base_model", str(base), "--models_to_merge",
                       str(nan_dir), "--save_path", str(tmp_path / "o")])
    assert_user_error(capsys, code, name, "NaN")
    assert not (tmp_path / "o").exists()


def test_passthrough_copies_in_row_chunks(family, monkeypatch, tmp_path):  # noqa: F811
    """passthrough reads, scales and writes every tensor a chunk of rows at a time: no read
    holds more than 64 elements, and the output is the whole-tensor copy's, bit for bit."""
    base, fts = family
    args = ["--method", "passthrough", "--base_model", str(base), "--models_to_merge",
            f"{fts[0]},{fts[1]}", "--layer_ranges", "0:1,1:2", "--scale", "0.5,1"]
    assert_chunked_is_whole(monkeypatch, tmp_path, args, "CHUNK_ELEMENTS")


@pytest.mark.parametrize("method, thread", [("dare_linear", "merge-ahead"),
                                            ("slerp", "MainThread")])
def test_statistics_run_ahead_and_read_the_base_once_per_chunk(family, monkeypatch,  # noqa: F811
                                                                tmp_path, method, thread):
    """DARE's L1 pass runs on the thread for work ahead (the merge's thread takes over only
    what is still queued when it would wait), every model's delta in one lockstep pass: each
    base chunk is asked for by every model there and read once. slerp's dots are gathered in
    line, on the merge thread (TwoPass(ahead=0))."""
    base, fts = family
    models = fts if method == "dare_linear" else fts[:1]
    options = (["--density", "0.5", "--rescale_mode", "l1"] if method == "dare_linear"
               else ["--t", "0.3"])
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(rows, "TWO_PASS_ELEMENTS", 64)
    monkeypatch.setattr(primitives, "CPU_BLOCK", 16)   # blocks inside the chunks, as in a merge
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    threads, asked, read = set(), [], []
    last_rows = runner._LastRows

    class Counted(last_rows):
        def __init__(self, source):
            super().__init__(source)
            self.source = type("Reads", (), {"get": lambda _, r: read.append(r) or
                                             source.get(r)})()

        def get(self, r):
            threads.add(threading.current_thread().name)
            asked.append(r)
            return super().get(r)

    monkeypatch.setattr(runner, "_LastRows", Counted)
    assert merge.main(["--method", method, "--base_model", str(base), "--models_to_merge",
                       ",".join(map(str, models)), *options,
                       "--save_path", str(tmp_path / "o")]) == 0
    assert any(name.startswith(thread) for name in threads)
    assert all(name.startswith((thread, "MainThread")) for name in threads)
    assert len(read) > 10 and len(asked) == len(models) * len(read)


def test_statistics_are_started_ahead_within_a_budget():
    """_FactsAhead starts the next tensors' statistics in order while the started, unmerged
    tensors hold fewer entries than their form's `ahead`, and always the tensor after the
    current one."""
    started: list[int] = []

    class Job:
        two_pass = type("Form", (), {"ahead": 25})

        def __init__(self, index: int, numel: int):
            self.index = index
            self.item = type("Item", (), {"out": type("Info", (), {"numel": numel})})

        def start_facts(self, submit):
            started.append(self.index)

        def facts_pending(self):
            return False

    jobs = [Job(k, n) for k, n in enumerate([10, 10, 10, 100, 10])]
    units = [runner.WorkUnit(f"t{j.index}", (r, r + 1), (1,), j, 1) for j in jobs for r in (0, 1)]
    ahead = runner._FactsAhead(units, submit=None)
    assert started == [0, 1, 2]            # 10 + 10 + 10 reached the budget
    for unit, want in zip(units, [[0, 1, 2], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3],
                                  [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3, 4]]):
        ahead.reached(unit)
        assert started == want, unit.name


def test_the_merge_gathers_queued_statistics_instead_of_waiting():
    """When the tensor about to be merged still has its statistics gathered on the thread for
    work ahead, the merge's thread gathers the queued ones of the next tensors itself instead
    of waiting: the first tensor's statistics here finish only once the second's are gathered,
    which happens on the merge's thread."""
    threads: dict[int, str] = {}
    first_running, second_done = threading.Event(), threading.Event()

    class Job:
        two_pass = type("Form", (), {"ahead": 25})
        start_facts = runner.TensorMerge.start_facts
        facts_pending = runner.TensorMerge.facts_pending
        gather_queued_facts = runner.TensorMerge.gather_queued_facts

        def __init__(self, index: int):
            self.index, self._facts = index, None
            self.item = type("Item", (), {"out": type("Info", (), {"numel": 10})})

        def _gather_facts(self):
            threads[self.index] = threading.current_thread().name
            if self.index == 0:
                first_running.set()
                assert second_done.wait(timeout=2), "the merge waited"
            if self.index == 1:
                second_done.set()
            return self.index

    jobs = [Job(0), Job(1)]
    units = [runner.WorkUnit(f"t{j.index}", (0, 1), (1,), j, 1) for j in jobs]
    with ThreadPoolExecutor(1, thread_name_prefix="ahead") as pool:
        ahead = runner._FactsAhead(units, pool.submit)
        assert first_running.wait(timeout=2)   # the first tensor's are being gathered there
        ahead.reached(units[0])
        assert jobs[0]._facts.result() == 0 and jobs[1]._facts.result() == 1
        ahead.reached(units[1])
    assert threads == {0: threads[0], 1: threading.current_thread().name}
    assert threads[0].startswith("ahead")


def test_the_largest_two_pass_tensors_are_merged_last(monkeypatch):
    """statistics_last moves the units of two-pass tensors above AHEAD_ELEMENTS / 2 behind the
    others, keeping both groups' order (chunks of a tensor stay together and in row order)."""
    monkeypatch.setattr(runner, "AHEAD_ELEMENTS", 100)

    def job(numel: int, two_pass: bool):
        item = type("Item", (), {"out": type("Info", (), {"numel": numel})})
        return type("Job", (), {"two_pass": object() if two_pass else None, "item": item})

    embed, held_large, small = job(80, True), job(80, False), job(50, True)
    plan = [("embed", embed, 2), ("copied", None, 1), ("attn", held_large, 1),
            ("mlp", small, 2), ("head", embed, 2)]
    units = [runner.WorkUnit(name, (r, r + 1), (1,), j, 1)
             for name, j, chunks in plan for r in range(chunks)]
    order = [(u.name, u.rows[0]) for u in runner.statistics_last(units)]
    assert order == [("copied", 0), ("attn", 0), ("mlp", 0), ("mlp", 1),
                     ("embed", 0), ("embed", 1), ("head", 0), ("head", 1)]
