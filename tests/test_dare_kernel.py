"""The compiled DARE mask kernel (merging_methods/dare_kernel.py, dare_mask.c): the bits of the
numpy path in every use, and its build: cached per source, compiler and CPU, never half-written,
never used where it cannot be built or disagrees."""
from __future__ import annotations

import logging
import os
import shutil
import time

import numpy as np
import pytest
import torch

import merge
from checkpoints import rows
from merging_methods import dare_kernel, primitives
from merging_methods.primitives import keep_bits, keep_mask, keep_threshold, mask_key
from tests.test_dare_masks import draw
from tests.test_merge_cli import family, load_weights  # noqa: F401 - fixture

BUILDABLE = (dare_kernel.REQUIRED_FLAG in dare_kernel.cpu_flags().split()
             and shutil.which(dare_kernel.compiler()[0]) is not None
             and os.environ.get(dare_kernel.SWITCH) != "0")
needs_kernel = pytest.mark.skipif(not BUILDABLE, reason="no AVX-512DQ CPU, no C compiler, or "
                                  f"{dare_kernel.SWITCH}=0")


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """An empty kernel cache of the test's own, and the process's choice made afresh."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(dare_kernel.SWITCH, raising=False)
    dare_kernel._load.cache_clear()
    yield tmp_path / "cache" / "aim-merging" / "kernels"
    dare_kernel._load.cache_clear()


def numpy_product(delta: torch.Tensor, key: int, density: float, start: int) -> torch.Tensor:
    """delta times keep_bits's 0/1 mask: the numpy path's result."""
    return delta * torch.from_numpy(keep_bits(key, density, start, delta.numel()).view(np.uint8))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as float32 bit patterns (a dropped negative entry is -0.0 in both)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@needs_kernel
@pytest.mark.parametrize("start,n", [(0, 0), (5, 1), (1, 2), (2, 5), (3, 4), (0, 8),
                                     (4097, (1 << 18) + 3), ((1 << 40) + 1, 1001)])
@pytest.mark.parametrize("density", [1 / 65536, 0.25, 0.5 + 1 / 131072, 65535 / 65536, 1.0])
def test_the_kernel_multiplies_by_the_numpy_masks_bit_for_bit(start, n, density):
    """Unaligned starts and ends (partial words at both ends, ranges inside one word), a start
    past 2**32 words, and the densities at the edges of the 16-bit steps; negative entries
    and zeros keep their signs as a float multiply gives them."""
    kernel = primitives.native_keep_mul()
    assert kernel is not None
    key = mask_key(3, 1, "model.layers.0.mlp.up_proj.weight")
    delta = torch.randn(n, generator=torch.Generator().manual_seed(n))
    delta[::7] = 0.0
    delta[1::7] = -0.0
    got = delta.clone()
    kernel(got, key, start, keep_threshold(density))
    assert same_bits(got, numpy_product(delta, key, density, start))


@needs_kernel
def test_the_kernel_keeps_the_entries_python_integers_say_to_keep():
    """Against mask rule 2 computed independently in Python integers (test_dare_masks.draw), on
    a range with partial words at both ends."""
    key, density = mask_key(3, 2, "model.layers.1.self_attn.o_proj.weight"), 0.61
    start, n = 4093, 41
    delta = torch.arange(1.0, n + 1)
    primitives.native_keep_mul()(delta, key, start, keep_threshold(density))
    t = keep_threshold(density)
    assert delta.tolist() == [float(i + 1) if draw(key, start + i) < t else 0.0 for i in range(n)]


@needs_kernel
def test_keep_mask_and_random_drop_give_the_numpy_bits_with_the_kernel(monkeypatch):
    """keep_mask (a float 0/1 mask) and RandomDrop over blocks in flat order, with the kernel
    and without it."""
    key, density, n = mask_key(0, 2, "w"), 0.37, 10_001
    delta = torch.linspace(-3, 3, n)
    with_kernel = keep_mask(key, density, 0, n)
    drop = primitives.RandomDrop(density, key, remember=n)
    dropped = torch.cat([drop.apply_(delta[s:s + 512].clone(), s) for s in range(0, n, 512)])
    monkeypatch.setattr(primitives, "native_keep_mul", lambda: None)
    assert torch.equal(with_kernel, keep_mask(key, density, 0, n))
    assert same_bits(dropped, numpy_product(delta, key, density, 0))


@needs_kernel
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("mode", ["l1", "inverse_density"])
def test_merges_are_the_same_with_and_without_the_kernel(
        family, monkeypatch, tmp_path, method, mode):  # noqa: F811
    """A CLI merge on CPU in 64-element chunks (two passes with statistics ahead for l1; masks
    drawn ahead by numpy for inverse_density, by the kernel in the merge otherwise) writes the
    same bytes with the compiled kernel as with numpy."""
    base, fts = family
    args = ["--method", method, "--base_model", base, "--models_to_merge",
            ",".join(map(str, fts)), "--density", "0.3,0.6,0.9", "--rescale_mode", mode,
            "--seed", "11"]
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(rows, "TWO_PASS_ELEMENTS", 64)
    monkeypatch.setattr(primitives, "CPU_BLOCK", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert primitives.native_keep_mul() is not None
    assert merge.main([str(a) for a in [*args, "--save_path", tmp_path / "kernel"]]) == 0
    monkeypatch.setenv(dare_kernel.SWITCH, "0")
    dare_kernel._load.cache_clear()
    try:
        assert primitives.native_keep_mul() is None
        assert merge.main([str(a) for a in [*args, "--save_path", tmp_path / "numpy"]]) == 0
    finally:
        dare_kernel._load.cache_clear()
    with_kernel, without = load_weights(tmp_path / "kernel"), load_weights(tmp_path / "numpy")
    assert with_kernel.keys() == without.keys()
    assert all(torch.equal(with_kernel[k], without[k]) for k in with_kernel)


@needs_kernel
def test_a_built_kernel_is_reused_from_the_cache(own_cache, monkeypatch):
    """The first use builds one library into the cache; a later process loads it without
    building again."""
    assert primitives.native_keep_mul() is not None
    assert [p.suffix for p in own_cache.iterdir()] == [".so"]
    dare_kernel._load.cache_clear()
    builds = []
    monkeypatch.setattr(dare_kernel, "build", lambda *a: builds.append(a))
    assert primitives.native_keep_mul() is not None
    assert builds == []


def test_the_library_is_named_by_source_compiler_and_cpu():
    """Another CPU (a cache shared between machines), compiler or source: another library."""
    names = {dare_kernel.library_path(source, command, flags)
             for source in (b"a", b"b") for command in (["cc"], ["clang"])
             for flags in ("avx512dq", "avx2")}
    assert len(names) == 8
    assert dare_kernel.library_path(b"a", ["cc"], "x") == dare_kernel.library_path(b"a", ["cc"],
                                                                                  "x")


def test_without_a_compiler_numpy_draws_the_masks(own_cache, monkeypatch):
    """A compiler that cannot run leaves no library and no partial file; DARE's masks come from
    numpy."""
    monkeypatch.setattr(dare_kernel, "cpu_flags", lambda: "sse2 avx512dq")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert primitives.native_keep_mul() is None
    assert not own_cache.exists() or list(own_cache.iterdir()) == []
    delta = torch.linspace(-1, 1, 99)
    key = mask_key(0, 0, "w")
    got = primitives.RandomDrop(0.5, key).apply_(delta.clone(), 7)
    assert same_bits(got, numpy_product(delta, key, 0.5, 7))


def test_a_failed_build_leaves_nothing_and_stale_partials_are_removed(own_cache, monkeypatch):
    """A compiler that fails (here `false`) leaves no partial file; a partial file older than
    STALE_SECONDS (a killed build's) is removed at the next build, a recent one (another
    process building now) is kept, and so is every other file in the folder, however old (a
    built library, anything else)."""
    own_cache.mkdir(parents=True)
    stale, recent = own_cache / "dare_mask-0-old.tmp", own_cache / "dare_mask-0-new.tmp"
    others = [own_cache / "dare_mask-0.so", own_cache / "model.safetensors",
              own_cache / "notes.tmp"]
    old = time.time() - dare_kernel.STALE_SECONDS - 60
    for path in (stale, recent, *others):
        path.write_bytes(b"bytes")
        if path is not recent:
            os.utime(path, (old, old))
    monkeypatch.setattr(dare_kernel, "cpu_flags", lambda: "avx512dq")
    monkeypatch.setenv("CC", "false")
    assert primitives.native_keep_mul() is None
    assert sorted(p.name for p in own_cache.iterdir()) == sorted(
        [recent.name, *(p.name for p in others)])
    assert all(p.read_bytes() == b"bytes" for p in others)


def test_a_relative_cache_home_is_not_used(monkeypatch, tmp_path):
    """XDG_CACHE_HOME must be absolute: a relative one (which would put the cache, and the
    builds' temporary files, in the working directory) falls back to ~/.cache."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    assert dare_kernel.cache_dir() == tmp_path / ".cache" / "aim-merging" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "abs"))
    assert dare_kernel.cache_dir() == tmp_path / "abs" / "aim-merging" / "kernels"


def test_no_build_on_a_cpu_without_avx512dq_or_when_switched_off(own_cache, monkeypatch):
    """Nothing is compiled on a CPU without AVX-512DQ (the numpy path is as fast there), nor
    with AIM_MERGING_KERNELS=0."""
    calls = []
    monkeypatch.setattr(dare_kernel, "build", lambda *a: calls.append(a))
    monkeypatch.setattr(dare_kernel, "cpu_flags", lambda: "sse2 avx2 avx512f")
    assert primitives.native_keep_mul() is None
    dare_kernel._load.cache_clear()
    monkeypatch.setattr(dare_kernel, "cpu_flags", lambda: "avx512dq")
    monkeypatch.setenv(dare_kernel.SWITCH, "0")
    assert primitives.native_keep_mul() is None
    assert calls == []


@needs_kernel
def test_a_kernel_that_disagrees_with_numpy_is_not_used(own_cache, monkeypatch, caplog):
    """A library that does not reproduce keep_bits on the check block (here: one that keeps
    everything) is refused with a warning."""
    monkeypatch.setattr(dare_kernel, "_bind", lambda library: lambda delta, key, start, t: None)
    with caplog.at_level(logging.WARNING, logger="merging_methods.dare_kernel"):
        assert primitives.native_keep_mul() is None
    assert "disagrees" in caplog.text
