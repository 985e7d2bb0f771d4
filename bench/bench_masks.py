"""Throughput of DARE's keep-masks: §4.3's rule 1 (`torch.rand(n, generator) < p` on the CPU,
then moved to the device) against mask rule 2 (counter-based, drawn on the device); on CPU also
rule 2 applied to a float32 delta block by block, as the merge applies it: numpy's draw and
torch's multiply against the compiled kernel (merging_methods/dare_kernel.py, when available).

Prints elements/s per rule as the median of --repeats interleaved runs.

    python bench/bench_masks.py --elements 16777216 --repeats 5 [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging_methods.primitives import (  # noqa: E402
    CPU_BLOCK, keep_bits, keep_mask, keep_threshold, mask_key, native_keep_mul,
)

DENSITY = 0.5
Multiply = Callable[[torch.Tensor, int, int], None]   # (delta block, mask key, its flat start)


def rule_1(n: int, device: torch.device) -> torch.Tensor:
    """The removed rule: a seeded CPU generator per (model, tensor), float32 rand < p."""
    generator = torch.Generator().manual_seed(mask_key(0, 0, "w") & ((1 << 63) - 1))
    return torch.rand(n, generator=generator).lt_(DENSITY).to(device)


def rule_2(n: int, device: torch.device) -> torch.Tensor:
    return keep_mask(mask_key(0, 0, "w"), DENSITY, 0, n, device)


def numpy_multiply(delta: torch.Tensor, key: int, start: int) -> None:
    delta.mul_(torch.from_numpy(keep_bits(key, DENSITY, start, delta.numel()).view(np.uint8)))


def kernel_multiply(kernel) -> Multiply:
    return lambda delta, key, start: kernel(delta, key, start, keep_threshold(DENSITY))


def applied(multiply: Multiply) -> Callable[[int, torch.device], None]:
    """Rule 2's masks of n entries applied to a CPU float32 delta in blocks of CPU_BLOCK."""
    delta = torch.ones(CPU_BLOCK)

    def draw(n: int, device: torch.device) -> None:  # noqa: ARG001 - CPU only
        key = mask_key(0, 0, "w")
        for start in range(0, n, CPU_BLOCK):
            multiply(delta[: min(CPU_BLOCK, n - start)], key, start)
    return draw


def seconds(draw: Callable[[int, torch.device], torch.Tensor], n: int,
            device: torch.device) -> float:
    """Wall time of one draw of n mask entries (device work finished)."""
    start = time.perf_counter()
    draw(n, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rules = {"rule 1 (torch.rand on CPU)": rule_1, "rule 2 (counter-based)": rule_2}
    if device.type == "cpu":
        rules["rule 2 applied: numpy draw, torch multiply"] = applied(numpy_multiply)
        kernel = native_keep_mul()
        if kernel is not None:
            rules["rule 2 applied: compiled kernel"] = applied(kernel_multiply(kernel))
    times: dict[str, list[float]] = {name: [] for name in rules}
    for draw in rules.values():   # warm-up: allocator, kernels
        seconds(draw, args.elements, device)
    for _ in range(args.repeats):
        for name, draw in rules.items():
            times[name].append(seconds(draw, args.elements, device))
    print(f"{args.elements} mask entries on {device}, {args.threads} CPU thread(s), "
          f"median of {args.repeats} interleaved runs")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name}: {args.elements / median / 1e6:.0f} M elements/s ({median * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
