"""Merging large tensors in row chunks (checkpoints/rows.py) gives the whole-tensor result."""
from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import load_file

import merge
import performAIM
from checkpoints import checkpoint, rows
from checkpoints.checkpoint import ShardedWriter, TensorInfo
from checkpoints.rows import row_ranges
from tests.test_aim_cli import CALIB
from tests.test_merge_cli import family, load_weights  # noqa: F401 - the fixture is used
from tests.test_vocab_union import EMBED, HEAD, drop_last_row
from tests.tiny_models import build_finetune


def test_row_ranges_cover_whole_rows():
    assert list(row_ranges((10, 3), split=False)) == [(0, 10)]
    assert list(row_ranges((), split=True)) == [None]
    assert list(row_ranges((0, 4), split=True)) == [(0, 0)]


def test_row_ranges_respect_the_chunk_size(monkeypatch):
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 7)
    assert list(row_ranges((5, 3), split=True)) == [(0, 2), (2, 4), (4, 5)]
    assert list(row_ranges((2, 9), split=True)) == [(0, 1), (1, 2)]   # a row is never split
    assert list(row_ranges((10,), split=True)) == [(0, 7), (7, 10)]


def test_writer_takes_rows_in_any_order(tmp_path):
    infos = {"a": TensorInfo((5, 3), torch.bfloat16), "s": TensorInfo((), torch.float32),
             "e": TensorInfo((0, 4), torch.float32)}
    a = torch.arange(15, dtype=torch.bfloat16).view(5, 3)
    writer = ShardedWriter(tmp_path, infos, 10**9)
    writer.add("a", a[3:], row_start=3)
    writer.add("s", torch.tensor(2.5))
    writer.add("a", a[:3])
    writer.add("e", torch.empty(0, 4))
    writer.close()
    got = load_file(tmp_path / "model.safetensors")
    assert torch.equal(got["a"], a) and got["s"].item() == 2.5 and got["e"].shape == (0, 4)
    partial = ShardedWriter(tmp_path / "p", {"a": infos["a"]}, 10**9)
    (tmp_path / "p").mkdir()
    partial.add("a", a[:2])
    with pytest.raises(RuntimeError, match="missing"):
        partial.close()
    with pytest.raises(ValueError):
        partial.add("a", a[:2], row_start=4)   # past the last row


_OPEN_DIRECT, _PWRITE = checkpoint._open_direct, os.pwrite


def _write_unaligned(folder, monkeypatch, direct: bool, refuse: bool = False
                     ) -> tuple[bytes, list[tuple[int, int]]]:
    """A shard of tensors whose bytes start and end off page boundaries, written in chunks out
    of order, with or without direct writes (a 3-page bounce buffer: several per chunk); the
    file's bytes and the (offset, length) of each direct write made. Where the file system has
    no O_DIRECT, the "direct" descriptor is a plain one, so the split into whole and partial
    pages is checked on any machine (and real O_DIRECT, which refuses unaligned writes, where it
    exists). `refuse`: the file system opens files for direct writes but refuses the writes."""
    monkeypatch.setattr(checkpoint, "DIRECT_WRITES", direct)
    monkeypatch.setattr(checkpoint, "DIRECT_PIECE", 3 * checkpoint.PAGE)
    direct_fds, made = set(), []
    real_open, real_pwrite = _OPEN_DIRECT, _PWRITE   # not an earlier call's wrappers

    def open_direct(path):
        fd = real_open(path)
        fd = os.open(path, os.O_WRONLY) if fd is None else fd
        direct_fds.add(fd)
        return fd

    def pwrite(fd, data, offset):
        if fd not in direct_fds:
            return real_pwrite(fd, data, offset)
        if refuse:
            raise OSError(errno.EINVAL, "direct write refused")
        try:
            written = real_pwrite(fd, data, offset)
        except OSError:   # real O_DIRECT refuses unaligned writes: recorded as length -1
            made.append((offset, -1))
            raise
        made.append((offset, written))
        return written

    monkeypatch.setattr(checkpoint, "_open_direct", open_direct)
    monkeypatch.setattr(os, "pwrite", pwrite)
    infos = {"a": TensorInfo((1001, 37), torch.bfloat16), "b": TensorInfo((5, 4099), torch.float32),
             "c": TensorInfo((3,), torch.float16), "d": TensorInfo((512, 300), torch.bfloat16)}
    generator = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(i.shape, generator=generator).to(i.dtype) for n, i in infos.items()}
    folder.mkdir()
    writer = ShardedWriter(folder, infos, 10**9, direct=True)
    for name in ("d", "c", "a", "b"):
        t = tensors[name]
        for start in range(0, t.shape[0], 200):
            writer.add(name, t[start:start + 200], row_start=start)
    writer.close()
    got = load_file(folder / "model.safetensors")
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    return (folder / "model.safetensors").read_bytes(), made


def test_direct_writes_give_the_page_cache_bytes(tmp_path, monkeypatch):
    """Whole pages through O_DIRECT, partial ones through the page cache: the same file, byte for
    byte, as writing everything through the page cache, every direct write page-aligned in
    offset and length; where the file system refuses direct writes, the rest goes through the
    page cache."""
    plain, none = _write_unaligned(tmp_path / "plain", monkeypatch, direct=False)
    direct, made = _write_unaligned(tmp_path / "direct", monkeypatch, direct=True)
    refused, _ = _write_unaligned(tmp_path / "refused", monkeypatch, direct=True, refuse=True)
    assert none == [] and len(made) > 20
    assert all(at % checkpoint.PAGE == 0 and size > 0 and size % checkpoint.PAGE == 0
               for at, size in made)
    assert direct == plain and refused == plain


@pytest.fixture(scope="module")
def vocab_models(family, tmp_path_factory):  # noqa: F811
    """The family's base plus a fine-tune with one row fewer and one with an added token."""
    base, fts = family
    root = tmp_path_factory.mktemp("chunks")
    fewer = build_finetune(base, root / "fewer", seed=7)
    drop_last_row(fewer)
    added = build_finetune(base, root / "added", seed=8, added_tokens=("[PAD]",))
    return base, [*fts, fewer, added]


def merge_both_ways(monkeypatch, tmp_path, args: list[str]) -> tuple[dict, dict]:
    """Merge once with one-row chunks and once whole; return both weight dicts."""
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    assert merge.main([*args, "--save_path", str(whole)]) == 0
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 1)
    assert merge.main([*args, "--save_path", str(chunked)]) == 0
    return load_weights(chunked), load_weights(whole)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("vocab", ["base", "union"])
def test_chunked_merge_is_bit_identical(vocab_models, monkeypatch, tmp_path, method, vocab):
    """fp32/bf16/.bin inputs, a fine-tune with a missing row and one with an added row: DARE
    masks, vocab fills and writer offsets all line up across one-row chunks."""
    base, models = vocab_models
    if vocab == "union":
        models = [m for m in models if m.name != "fewer"]
    args = ["--method", method, "--base_model", str(base), "--models_to_merge",
            ",".join(map(str, models)), "--vocab", vocab]
    if method.startswith("dare"):
        args += ["--density", "0.5"]
    got, want = merge_both_ways(monkeypatch, tmp_path, args)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_missing_rows_take_the_base_rows(vocab_models, monkeypatch, tmp_path):
    """--vocab base: the fine-tune lacking the last row adds no delta there (dense check)."""
    base, models = vocab_models
    fewer = next(m for m in models if m.name == "fewer")
    args = ["--method", "task_arithmetic", "--base_model", str(base), "--models_to_merge",
            str(fewer)]
    got, _ = merge_both_ways(monkeypatch, tmp_path, args)
    b, f = load_weights(base), load_weights(fewer)
    for name in (EMBED, HEAD):
        want = torch.cat([f[name], b[name][-1:]])
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)


def test_inline_aim_in_chunks_equals_whole(vocab_models, monkeypatch, tmp_path):
    base, models = vocab_models
    args = ["--method", "dare_ties", "--density", "0.5", "--base_model", str(base),
            "--models_to_merge", f"{models[0]},{models[1]}", "--aim", "--omega", "0.4",
            "--calib_data", "builtin", "--stats", str(tmp_path / "stats.safetensors"), *CALIB]
    got, want = merge_both_ways(monkeypatch, tmp_path, args)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_performaim_in_chunks_equals_whole(vocab_models, monkeypatch, tmp_path):
    """performAIM relaxes row chunks; a merged model with a grown vocabulary gets the base's
    mean rows chunk by chunk."""
    base, models = vocab_models
    added = next(m for m in models if m.name == "added")
    merged = tmp_path / "merged"
    assert merge.main(["--method", "task_arithmetic", "--base_model", str(base), "--models_to_merge",
                       f"{models[0]},{added}", "--vocab", "union", "--save_path", str(merged)]) == 0
    args = ["--merged_model", str(merged), "--pretrained_model_name", str(base), "--omega", "0.4",
            "--calib_data", "builtin", "--stats", str(tmp_path / "stats.safetensors"), *CALIB]
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    assert performAIM.main([*args, "--save_path", str(whole)]) == 0
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 1)
    assert performAIM.main([*args, "--save_path", str(chunked)]) == 0
    got, want = load_weights(chunked), load_weights(whole)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert got[HEAD].shape[0] == load_weights(base)[HEAD].shape[0] + 1
