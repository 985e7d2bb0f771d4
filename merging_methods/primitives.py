"""Per-tensor building blocks of the merge methods: blocked deltas, exact top-k, DARE masks.

Every method works on flat float32 tensors one block of `block_size(device)` elements at a time,
writing into reused block-sized scratch buffers. Fresh full-size temporaries page-fault at about
1 GB/s on the target machines while cache-resident blocks run several times faster
(PERFORMANCE.md), and the scratch memory stays constant however large the tensor is.
Masks are applied with float ops (hardshrink, 0/1 multipliers): boolean kernels are several
times slower here.

Specification: ALGORITHMS.md sections 0.5 (top-k), 3.2 (TIES trim), 4.2 (DARE); DARE's masks
follow mask rule 2 (issue 14, replacing §4.3's `torch.rand(shape, generator) < p`):

    key  = first 8 bytes (big-endian) of SHA-256(f"{seed}:{i}:{name}")   (model i, tensor name)
    w_k  = SplitMix64 output k from state `key`: mix(key + (k+1)·GOLDEN mod 2**64), with
           mix(z): z ^= z >> 30; z *= MIX1; z ^= z >> 27; z *= MIX2; z ^= z >> 31  (logical
           shifts, products mod 2**64; GOLDEN, MIX1, MIX2 below)
    u_j  = bits 16·(j mod 4) .. 16·(j mod 4)+15 of w_{j div 4}   (flat element j, 4 per word)
    keep element j  iff  u_j < t,   t = floor(density·65536 + 0.5)   (t = 0 is a UserError)

DARE rescales by the density actually used, t / 65536. A mask is a function of (seed, i, name,
j) only: the same bits on CPU and CUDA, in any chunking and order, computed on the device. On a
CPU with AVX-512DQ a compiled loop (dare_kernel.py) draws and applies it, else numpy and torch.
"""
from __future__ import annotations

import functools
import hashlib
import math
import struct
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from checkpoints.errors import UserError
from merging_methods.dare_kernel import KeepMul, keep_mul_kernel

L1_EPS = 1e-7  # below this an L1 norm is treated as zero and the rescale is skipped (§3.2, §4.2)
_HI_BINS = 1 << 15  # radix-select buckets: the top 16 bits of a non-negative float32 (sign bit 0)
_LO_BINS = 1 << 16  # the low 16 bits within the selected bucket
SAMPLE = 1 << 14  # entries sampled to spot a tied top-k threshold
CPU_BLOCK, ACCELERATOR_BLOCK = 1 << 18, 1 << 24  # 1 MiB of float32: N+3 blocks stay in L3


def block_size(device: torch.device) -> int:
    """Elements per block: cache-resident on CPU (one CPU_BLOCK per torch thread, so that
    each parallel op still gives every thread a full block), large on accelerators."""
    return CPU_BLOCK * torch.get_num_threads() if device.type == "cpu" else ACCELERATOR_BLOCK


def vector_norm(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """The L2 norm as the square root of a sum of squares (over `dim`, else every entry).

    torch's float32 `linalg.vector_norm` on CPU loses accuracy as the tensor grows (measured
    relative error 8e-5 at 4M entries, 7e-4 at 16M; a sum of squares stays near 1e-7), which
    made the whole-tensor norms of an embedding 0.1-0.7% off."""
    squares = x.square()
    return (squares.sum() if dim is None else squares.sum(dim, keepdim=keepdim)).sqrt_()


def blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges covering 0..n in steps of `size`."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def mask_generator(seed: int, model_index: int, tensor_name: str) -> torch.Generator:
    """CPU generator of (model, tensor), seeded by `mask_key` masked to 63 bits (DELLA's masks,
    §17.3: drawn as torch.rand, so they do not depend on streaming order, device or process)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mask_key(seed, model_index, tensor_name) & ((1 << 63) - 1))
    return generator


MASK_RULE = 2  # the DARE mask rule of the module docstring; recipes record it
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MIX_STEPS = ((30, MIX1), (27, MIX2), (31, 1))  # (right shift, multiplier) of SplitMix64's mix
DENSITY_STEPS = 1 << 16  # a mask draw is a 16-bit lane: density is quantised to 1/65536
LANES = 4  # 16-bit draws per 64-bit word
_FLIP = 0x8000800080008000  # lane sign bits: unsigned u < t  <=>  signed (u ^ 0x8000) < t - 2**15


def mask_key(seed: int, model_index: int, tensor_name: str) -> int:
    """The 64-bit key of (seed, model, tensor): SHA-256 of f"{seed}:{i}:{name}", first 8 bytes
    big-endian. Hashed once per tensor on the host; the per-element work is `keep_mask`."""
    digest = hashlib.sha256(f"{seed}:{model_index}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _int64(value: int) -> int:
    """A 64-bit pattern as the signed int64 torch stores (two's complement)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def keep_threshold(density: float) -> int:
    """t = floor(density·65536 + 0.5): DARE keeps a 16-bit draw u where u < t; a UserError when
    the density rounds to 0."""
    t = min(math.floor(density * DENSITY_STEPS + 0.5), DENSITY_STEPS)
    if t <= 0:
        raise UserError(f"--density: density {density} rounds to 0 in steps of 1/{DENSITY_STEPS}; "
                        f"use at least {1 / DENSITY_STEPS:.3g}")
    return t


def used_density(density: float) -> float:
    """The density DARE's masks keep in expectation and rescale by: t / 65536."""
    return keep_threshold(density) / DENSITY_STEPS


def splitmix64_(words: Tensor, scratch: Tensor) -> Tensor:
    """SplitMix64's mix of int64 `words`, in place (wrap-around products; a logical right shift
    is the arithmetic one with the sign-filled top bits masked off). `scratch` is like `words`.

    On CPU the same mix runs in numpy's uint64 (a view of the same memory): its logical shifts
    are vectorised, torch's int64 shift is not (measured: the mix about 3x faster; tests check
    both give the same bits)."""
    if words.device.type == "cpu":
        return _splitmix64_numpy_(words, scratch)
    return _splitmix64_torch_(words, scratch)


def _splitmix64_torch_(words: Tensor, scratch: Tensor) -> Tensor:
    """`splitmix64_` in torch int64 ops, on any device."""
    for shift, multiplier in MIX_STEPS:
        torch.bitwise_right_shift(words, shift, out=scratch).bitwise_and_((1 << (64 - shift)) - 1)
        words.bitwise_xor_(scratch)
        if multiplier != 1:
            words.mul_(_int64(multiplier))
    return words


def _splitmix64_numpy_(words: Tensor, scratch: Tensor) -> Tensor:
    """`splitmix64_` on CPU int64 tensors, through uint64 numpy views of their memory."""
    w, s = words.numpy().view(np.uint64), scratch.numpy().view(np.uint64)
    for shift, multiplier in MIX_STEPS:
        np.right_shift(w, np.uint64(shift), out=s)
        np.bitwise_xor(w, s, out=w)
        if multiplier != 1:
            np.multiply(w, np.uint64(multiplier), out=w)
    return words


@functools.lru_cache(maxsize=4)
def _golden_ramp(size: int, device: torch.device) -> Tensor:
    """k·GOLDEN mod 2**64 for k = 0 .. size-1 (int64), made once per block size and device:
    rebuilding it for every block took a sixth of a mask's time. Read only."""
    return torch.arange(size, dtype=torch.int64, device=device).mul_(_int64(GOLDEN))


def _mixed_words(key: int, start: int, n: int, device: torch.device
                 ) -> Iterator[tuple[int, Tensor]]:
    """(flat index of the block's first draw, its words w_k) for blocks of `block_size` draws
    covering flat elements start .. start+n-1 (mask rule 2): the words are built in two reused
    buffers, so that on CPU the dozen integer passes stay in cache. A yielded block is
    overwritten by the next one."""
    first, stop = start // LANES, -(-(start + n) // LANES)  # the words holding the entries
    size = min(block_size(device) // LANES, max(stop - first, 1))
    ramp = _golden_ramp(block_size(device) // LANES, device)[:size]
    words, scratch = torch.empty_like(ramp), torch.empty_like(ramp)
    for lo, hi in blocks(stop - first, size):
        state = torch.add(ramp[: hi - lo], _int64(key + (first + lo + 1) * GOLDEN),
                          out=words[: hi - lo])  # key + (k+1)·GOLDEN for words k = first + lo ...
        yield (first + lo) * LANES, splitmix64_(state, scratch[: hi - lo])


def _little_endian() -> None:
    """The lane views below read a word's low 16 bits first."""
    if sys.byteorder != "little":
        raise RuntimeError("DARE masks need a little-endian host")


def keep_bits(key: int, density: float, start: int, n: int) -> np.ndarray:
    """Keep-decisions of flat elements start .. start+n-1 under mask rule 2, as a numpy bool
    array, computed on the CPU: numpy compares the unsigned 16-bit lanes directly (torch's
    comparison into float32 took three times as long)."""
    t = keep_threshold(density)
    if t == DENSITY_STEPS:  # t = 65536 keeps every u (and is no uint16)
        return np.ones(n, dtype=bool)
    _little_endian()
    out = np.empty(n, dtype=bool)
    for begin, words in _mixed_words(key, start, n, torch.device("cpu")):
        lanes = words.numpy().view(np.uint16)  # 4 draws per word, its low lane first
        a, b = max(start, begin), min(start + n, begin + lanes.size)
        np.less(lanes[a - begin: b - begin], t, out=out[a - start: b - start])
    return out


def keep_mask(key: int, density: float, start: int, n: int,
              device: torch.device | str = "cpu") -> Tensor:
    """Keep-mask of flat elements start .. start+n-1 under mask rule 2 (module docstring): float32
    1 where kept, 0 where dropped (a float multiplier: boolean kernels are slow here), computed
    on `device`."""
    device = torch.device(device)
    if device.type != "cpu":
        return _keep_mask_on(device, key, density, start, n)
    kernel = native_keep_mul()
    if kernel is None:
        return torch.from_numpy(keep_bits(key, density, start, n).view(np.uint8)).float()
    ones = torch.ones(n, dtype=torch.float32)
    kernel(ones, key, start, keep_threshold(density))
    return ones


# the kernel's acceptance check: a block at an unaligned flat index, of a length that ends
# inside a word, for two densities
CHECK_START, CHECK_ENTRIES, CHECK_DENSITIES = (1 << 33) + 3, 4099, (0.3, 0.9)


def _agrees_with_numpy(kernel: KeepMul) -> bool:
    """Whether `kernel` multiplies a delta by `keep_bits`'s masks bit for bit (signed zeros too)."""
    key = mask_key(0, 0, "kernel check")
    delta = torch.linspace(-1, 1, CHECK_ENTRIES)
    for density in CHECK_DENSITIES:
        expected = delta * torch.from_numpy(
            keep_bits(key, density, CHECK_START, CHECK_ENTRIES).view(np.uint8))
        got = delta.clone()
        kernel(got, key, CHECK_START, keep_threshold(density))
        if not torch.equal(got.view(torch.int32), expected.view(torch.int32)):
            return False
    return True


def native_keep_mul() -> KeepMul | None:
    """The compiled mask-rule-2 multiply (dare_kernel.py) where it is available and checked
    against `keep_bits`, else None."""
    return keep_mul_kernel(_agrees_with_numpy)


def _keep_mask_on(device: torch.device, key: int, density: float, start: int, n: int) -> Tensor:
    """`keep_mask` in torch ops only, for accelerators: the unsigned lanes are compared as
    signed int16 after flipping their sign bits (torch has no uint16 comparison)."""
    bound = keep_threshold(density) - DENSITY_STEPS // 2  # t in the flipped, signed lanes
    if bound == DENSITY_STEPS // 2:
        return torch.ones(n, dtype=torch.float32, device=device)
    _little_endian()
    out = torch.empty(n, dtype=torch.float32, device=device)
    for begin, words in _mixed_words(key, start, n, device):
        draws = words.bitwise_xor_(_int64(_FLIP)).view(torch.int16)
        a, b = max(start, begin), min(start + n, begin + draws.numel())
        torch.lt(draws[a - begin: b - begin], bound, out=out[a - start: b - start])
    return out


class Upcast:
    """The float32 copy of the last stored-dtype block asked for, kept while the models' deltas
    ask for the same base block in turn (the lockstep passes, `_weighted_sum`): one conversion
    for all models. A copy and a float32 subtraction took two thirds of the time of torch's
    mixed-dtype subtraction (bf16 from float32). The block asked for is held, so its memory
    (the key) cannot be reused by another tensor while it is kept."""

    def __init__(self, size: int, device: torch.device):
        self._buf = torch.empty(size, dtype=torch.float32, device=device)
        self._key: tuple[int, int, torch.dtype] | None = None
        self._held: Tensor | None = None

    def of(self, block: Tensor) -> Tensor:
        """`block` (1-D, at most `size` entries) as float32, exact."""
        out = self._buf[: block.numel()]
        key = (block.data_ptr(), block.numel(), block.dtype)
        if key != self._key:
            self._key, self._held = key, block
            out.copy_(block)
        return out


class Deltas:
    """Flat float32 blocks of `other - base`, computed on demand into one reused scratch buffer.

    `base` and `other` may be stored bf16/fp16 (the upcast to float32 is exact); deltas of one
    base may share an `Upcast` of its blocks. A block returned by `block` or the iterator is
    overwritten by the next one; callers may modify it in place.
    """

    def __init__(self, base: Tensor, other: Tensor, size: int, upcast: Upcast | None = None):
        self.base, self.other = base.reshape(-1), other.reshape(-1)
        self.n, self.size = self.base.numel(), size
        self._buf = torch.empty(min(size, self.n), dtype=torch.float32, device=base.device)
        # torch computes a difference in its inputs' common dtype: a float32 operand makes it
        # exact in one op; two narrow operands need an explicit upcast first
        self._one_op = torch.float32 in (self.base.dtype, self.other.dtype)
        self._upcast = None if self._one_op else upcast or Upcast(self._buf.numel(), base.device)

    def block(self, start: int, stop: int) -> Tensor:
        out = self._buf[: stop - start]
        if self._one_op:
            return torch.sub(self.other[start:stop], self.base[start:stop], out=out)
        return torch.sub(out.copy_(self.other[start:stop]),
                         self._upcast.of(self.base[start:stop]), out=out)

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        for start, stop in blocks(self.n, self.size):
            yield start, self.block(start, stop)

    def new_buffer(self) -> Tensor:
        """An uninitialised float buffer of one block."""
        return torch.empty_like(self._buf)

    def sample(self) -> Tensor:
        """About SAMPLE evenly strided entries of the delta (a fresh tensor)."""
        step = max(1, self.n // SAMPLE)
        return torch.sub(self.other[::step].float(), self.base[::step])


def topk_count(density: float, n: int, at_least_one: bool = False) -> int:
    """k = floor(density * n), the number of entries top-k keeps; k = 0 is a user error (§0.5),
    unless `at_least_one` (mergekit 0.1.5's trim, §19.3): then k = max(1, floor(density * n))."""
    k = math.floor(density * n)
    if at_least_one:
        k = max(k, 1)
    if k <= 0:
        raise UserError(f"--density: density {density} too small for tensor of {n} elements; "
                        f"use a density of at least {1 / n:.3g} or 1 to disable trimming")
    return min(k, n)


def _bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _float_to_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


@dataclass(frozen=True)
class Threshold:
    """The k-th largest |x| (float32 bit pattern) and how many entries equal to it top-k keeps.

    Top-k keeps every |x| > value and the first `keep_equal` (in flat order) of the `equal`
    entries with |x| == value: exactly k entries, lower flat index first among ties (§0.5).
    """

    bits: int
    keep_equal: int
    equal: int

    @property
    def value(self) -> float:
        return _bits_to_float(self.bits)


AbsBlocks = Callable[[], Iterable[tuple[int, Tensor]]]  # yields (start, |x| block) in flat order


def _locate(hist: Tensor, rank: int) -> tuple[int, int]:
    """Bin holding the 0-based ascending `rank`, and the count of entries in the bins below it."""
    cum = hist.cumsum(0)
    index = int(torch.searchsorted(cum, rank, right=True))
    return index, int(cum[index - 1]) if index else 0


def _radix_select(abs_blocks: AbsBlocks, n: int, k: int, scratch: Tensor) -> Threshold:
    """Exact k-th largest by a radix select on the float bit patterns: two passes, no sort.

    Non-negative float32 values order like their bit patterns: a histogram of the top 16 bits
    finds the bucket holding the k-th largest, a histogram of the low 16 bits inside it the value.
    """
    rank = n - k  # ascending position of the k-th largest value
    keys = scratch.view(torch.int32)
    hist = torch.zeros(_HI_BINS, dtype=torch.int64)
    for _, a in abs_blocks():
        high_bits = torch.bitwise_right_shift(a.view(torch.int32), 16, out=keys[: a.numel()])
        hist += torch.bincount(high_bits, minlength=_HI_BINS).cpu()
    high, below_high = _locate(hist, rank)
    hist = torch.zeros(_LO_BINS + 2, dtype=torch.int64)
    for _, a in abs_blocks():
        # 1 + low 16 bits inside the bucket; 0 below it, _LO_BINS + 1 above (cheaper than a gather)
        low_bits = torch.sub(a.view(torch.int32), (high << 16) - 1, out=keys[: a.numel()])
        hist += torch.bincount(low_bits.clamp_(0, _LO_BINS + 1), minlength=_LO_BINS + 2).cpu()
    low, below_low = _locate(hist[1:-1], rank - below_high)  # hist[0] == below_high
    equal = int(hist[1 + low])
    above = n - below_high - below_low - equal
    return Threshold((high << 16) | low, k - above, equal)


def _tied_guess(sample: Tensor, n: int, k: int) -> float | None:
    """The value the k-th largest |x| almost surely equals, if the sample shows a long tie there.

    Checkpoints stored in bf16/fp16 have few distinct |delta| values, so the threshold often
    sits inside a long run of equal values; continuous data gives no guess.
    """
    ordered = sample.sort().values
    m = ordered.numel()
    rank = (n - k) / n * (m - 1)  # expected ascending position of the threshold in the sample
    margin = 3 * math.sqrt(m * (k / n) * (1 - k / n)) + 1  # three standard deviations
    low = ordered[max(0, math.floor(rank - margin))]
    high = ordered[min(m - 1, math.ceil(rank + margin))]
    return float(low) if bool(low == high) else None


def _count_select(abs_blocks: AbsBlocks, n: int, k: int, guess: float,
                  scratch: Tensor) -> Threshold | None:
    """One counting pass: `guess` is the k-th largest iff #(|x| > guess) < k <= #(|x| >= guess)."""
    above = equal = 0
    for _, a in abs_blocks():
        work = scratch[: a.numel()]
        above += int(torch.gt(a, guess, out=work).sum())  # float 0/1 sums: exact below 2**24
        equal += int(torch.eq(a, guess, out=work).sum())
    if not above < k <= above + equal:
        return None
    return Threshold(_float_to_bits(guess), k - above, equal)


def plan_topk(abs_blocks: AbsBlocks, n: int, k: int, scratch: Tensor,
              sample: Tensor | None = None) -> Threshold:
    """Exact threshold of the top-k of n non-negative float32 values (§0.5), in O(n), no sort.

    `abs_blocks()` yields the values as (start, block) in flat order; it may be called up to
    three times and its blocks are only read. `scratch` is a float32 buffer of one block.
    When `sample` (a strided subset) shows a long tie at the threshold, one counting pass
    verifies it; otherwise, or if the count refutes it, a two-pass radix select runs.
    """
    guess = _tied_guess(sample, n, k) if sample is not None and sample.numel() else None
    if guess is not None:
        found = _count_select(abs_blocks, n, k, guess, scratch)
        if found is not None:
            return found
    return _radix_select(abs_blocks, n, k, scratch)


def keep_topk(x: Tensor, density: float, size: int | None = None,
              at_least_one: bool = False) -> Tensor:
    """Boolean mask of exactly floor(density*n) largest |x| (`at_least_one`: at least 1), lower
    flat index first among ties.

    A whole-tensor helper with the same selection as the TIES trim (for checks and tests).
    """
    k = topk_count(density, x.numel(), at_least_one)
    return largest_mask(x.reshape(-1).abs(), k, size).view_as(x)


def largest_mask(flat: Tensor, k: int, size: int | None = None) -> Tensor:
    """Boolean mask of the k largest entries of the flat, non-negative float32 `flat` (0 <= k
    <= n), lower index first among ties (§0.5), found by `plan_topk` (no sort)."""
    n = flat.numel()
    if k == n or k == 0:
        return torch.full_like(flat, k > 0, dtype=torch.bool)
    size = size or block_size(flat.device)
    cut = plan_topk(lambda: ((s, flat[s:e]) for s, e in blocks(n, size)), n, k,
                    torch.empty(min(n, size), device=flat.device), flat[:: max(1, n // SAMPLE)])
    keep = flat > cut.value
    keep[torch.nonzero(flat == cut.value).flatten()[: cut.keep_equal]] = True
    return keep


def abs_blocks_of(deltas: Deltas) -> AbsBlocks:
    """The |δ| blocks of `deltas` for plan_topk, each taken in place (the blocks are scratch)."""
    def abs_blocks() -> Iterator[tuple[int, Tensor]]:
        for start, delta in deltas:
            yield start, delta.abs_()
    return abs_blocks


class TieRun:
    """The first `count` of the `equal` entries with |x| == value, in flat order: where that
    run ends is found while blocks pass by in flat order (counting ties), then remembered."""

    def __init__(self, value: float, count: int, equal: int, n: int):
        self.value, self.count = value, count
        self.end: int | None = n if count == equal else 0 if count == 0 else None
        self._seen = 0

    def cut(self, delta: Tensor, start: int, scratch: Tensor) -> int:
        """Leading entries of this block (flat offset `start`) before the run's end."""
        if self.end is None:
            equal = torch.abs(delta, out=scratch[: delta.numel()]).eq_(self.value)
            count = int(equal.sum())  # float 0/1 sum: exact for blocks under 2**24
            if self._seen + count < self.count:
                self._seen += count
                return delta.numel()
            position = int(torch.nonzero(equal)[self.count - self._seen - 1])
            self.end = start + position + 1
        return min(max(self.end - start, 0), delta.numel())


class TopK:
    """Magnitude trim of one model's delta (§3.2): keep exactly floor(density*n) largest |δ|.

    Blocks must be applied in flat order: where the kept run of ties ends is found on the way
    (counting ties block by block) and remembered for later passes.
    """

    def __init__(self, deltas: Deltas, density: float, at_least_one: bool = False):
        n = deltas.n
        self._scratch = deltas.new_buffer()
        sample = deltas.sample().abs_()
        self.cut = plan_topk(abs_blocks_of(deltas), n, topk_count(density, n, at_least_one),
                             self._scratch, sample)
        # hardshrink(x, below) keeps |x| >= threshold: `below` is the float32 just under it
        self._below = _bits_to_float(self.cut.bits - 1) if self.cut.bits else -1.0
        # kept zeros change nothing, so with a zero threshold every tie may as well be kept
        kept = self.cut.equal if self.cut.bits == 0 else self.cut.keep_equal
        self.ties = TieRun(self.cut.value, kept, self.cut.equal, n)

    def apply_(self, delta: Tensor, start: int) -> Tensor:
        """Zero, in place, the entries of this block (flat offset `start`) that top-k drops."""
        if self.cut.bits == 0:  # threshold 0: every non-zero entry is kept
            return delta
        cut = self.ties.cut(delta, start, self._scratch)
        hardshrink = torch.nn.functional.hardshrink  # keeps |x| > lambd, zeroes the rest
        if cut:
            delta[:cut] = hardshrink(delta[:cut], self._below)
        if cut < delta.numel():
            delta[cut:] = hardshrink(delta[cut:], self.cut.value)
        return delta


# DARE's masks are kept for a tensor's second use up to this size: 16 MiB of packed bits per
# model (a larger tensor's masks are drawn again, so memory stays flat)
REMEMBERED_MASK_ELEMENTS = 1 << 27


class RandomDrop:
    """DARE drop (§4.2, mask rule 2): keep each entry where its counter-based draw is below the
    density; stateless, so blocks may come in any order, on any device.

    On CPU the compiled kernel draws and applies each block's mask in one loop where it is
    available. Otherwise, with `remember=n` (a tensor of n entries whose mask is used twice:
    the L1 factor's pass, then the merge's) the masks drawn by numpy in flat order from 0 are
    kept as packed bits, n/8 bytes, and later blocks inside that range are unpacked instead of
    drawn again (about a fifth of a draw's time; the kernel draws faster than that).
    `offset`: the flat index in the whole tensor of the entry the blocks' `start` 0 is (a row
    chunk merged alone)."""

    def __init__(self, density: float, key: int, remember: int | None = None, offset: int = 0):
        self.density, self.key, self._remember, self.offset = density, key, remember, offset
        self._bits: np.ndarray | None = None   # allocated at the first numpy draw to remember
        self._drawn = 0   # masks of entries 0 .. _drawn - 1 are in _bits

    def apply_(self, delta: Tensor, start: int) -> Tensor:
        n, start = delta.numel(), start + self.offset
        if delta.device.type != "cpu":
            return delta.mul_(keep_mask(self.key, self.density, start, n, delta.device))
        kernel = native_keep_mul()
        if kernel is not None and delta.dtype == torch.float32 and delta.is_contiguous():
            kernel(delta, self.key, start, keep_threshold(self.density))
            return delta
        if self._bits is not None and start + n <= self._drawn:
            first = start // 8
            unpacked = np.unpackbits(self._bits[first: -(-(start + n) // 8)])
            return delta.mul_(torch.from_numpy(unpacked[start - 8 * first: start - 8 * first + n]))
        keep = keep_bits(self.key, self.density, start, n)
        if self._remember is not None and start == self._drawn and start % 8 == 0:
            if self._bits is None:
                self._bits = np.empty(-(-self._remember // 8), dtype=np.uint8)
            self._bits[start // 8: -(-(start + n) // 8)] = np.packbits(keep)
            self._drawn += n
        return delta.mul_(torch.from_numpy(keep.view(np.uint8)))


class PresetDrop:
    """DARE drop with a keep-mask drawn ahead by `keep_mask` (same masks as RandomDrop)."""

    def __init__(self, keep: Tensor):
        self.keep = keep.reshape(-1)

    def apply_(self, delta: Tensor, start: int) -> Tensor:
        return delta.mul_(self.keep[start:start + delta.numel()].to(delta.device))


def l1_ratio(total: float, kept: float) -> float:
    """‖δ‖₁ / ‖sparse(δ)‖₁, or 1 when either norm is below 1e-7 (L1 rescale of §3.2 and §4.2)."""
    return total / kept if total >= L1_EPS and kept >= L1_EPS else 1.0


def blocked_l1(x: Tensor) -> float:
    """‖x‖₁ as the blocked passes sum it: a float32 sum of |x| per block of `block_size`, the
    blocks in double. The whole-tensor methods use it so that their rescale factor has the same
    bits (a sum of |x|: torch's `vector_norm(x, 1)` took 4x as long on CPU)."""
    flat = x.reshape(-1)
    total = 0.0
    for start, stop in blocks(flat.numel(), block_size(flat.device)):
        total += float(flat[start:stop].abs().sum())
    return total


class MatchL1:
    """A plan's factor that says "the L1 ratio of this model's delta and its sparse version"
    (§3.2, §4.2): left to `l1_factors`, which finds every model's ratio in one joint pass."""


MATCH_L1 = MatchL1()


def l1_factors(models: Sequence[Iterable[tuple[int, Tensor]]],
               sparsifiers: Sequence[TopK | RandomDrop | PresetDrop]) -> list[float]:
    """`l1_ratio` of each model's delta (its (start, block) in flat order, blocks it may
    modify), the models' blocks taken in lockstep: one pass, in which a streamed tensor reads
    each chunk of the base once. The sparsifier is applied to |δ| (every sparsifier here keeps
    or zeroes entries by |δ| or position, so the kept |δ| are |sparse(δ)|, with `blocked_l1`'s
    bits)."""
    total, kept = [0.0] * len(models), [0.0] * len(models)
    for step in zip(*models):
        for j, ((start, delta), sparsifier) in enumerate(zip(step, sparsifiers)):
            magnitude = delta.abs_()
            total[j] += float(magnitude.sum())
            kept[j] += float(sparsifier.apply_(magnitude, start).sum())
    return [l1_ratio(t, k) for t, k in zip(total, kept)]


def dense_delta(deltas: Deltas) -> Tensor:
    """The whole flat float32 delta `other - base`, equal bit for bit to the blocks of `deltas`.

    For sparsifiers that need the whole tensor at once (ranks, FFT) before the blocked pass."""
    if deltas._one_op:
        return torch.sub(deltas.other, deltas.base)
    return deltas.other.float().sub_(deltas.base)


def abs_rank_prefix(x: Tensor, count: int) -> Tensor:
    """Boolean mask of the `count` first entries of the stable ascending order of |x| (flat).

    The smallest magnitudes, lower flat index first among ties; found with the exact top-k
    threshold of the other n - count entries (§0.5), so no sort runs. `x` is float32.
    """
    flat = x.reshape(-1).abs()
    n = flat.numel()
    if count <= 0 or count >= n:
        return torch.full_like(x, count > 0, dtype=torch.bool)
    size = block_size(x.device)
    cut = plan_topk(lambda: ((s, flat[s:e]) for s, e in blocks(n, size)), n, n - count,
                    torch.empty(min(n, size), device=x.device), flat[:: max(1, n // SAMPLE)])
    # the n - count largest are every |x| > cut plus the *last* keep_equal ties in flat order
    prefix = flat < cut.value
    prefix[torch.nonzero(flat == cut.value).flatten()[: cut.equal - cut.keep_equal]] = True
    return prefix.view_as(x)


def abs_rank_band(x: Tensor, start: int, stop: int) -> Tensor:
    """Boolean mask of the entries at positions start..stop-1 of the stable ascending order
    of |x| (flat, lower index first among ties)."""
    return abs_rank_prefix(x, stop) & ~abs_rank_prefix(x, start)
