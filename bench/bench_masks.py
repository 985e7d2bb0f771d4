"""Throughput of DARE's keep-masks: §4.3's rule 1 (`torch.rand(n, generator) < p` on the CPU,
then moved to the device) against mask rule 2 (counter-based, drawn on the device).

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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging_methods.primitives import keep_mask, mask_key  # noqa: E402

DENSITY = 0.5


def rule_1(n: int, device: torch.device) -> torch.Tensor:
    """The removed rule: a seeded CPU generator per (model, tensor), float32 rand < p."""
    generator = torch.Generator().manual_seed(mask_key(0, 0, "w") & ((1 << 63) - 1))
    return torch.rand(n, generator=generator).lt_(DENSITY).to(device)


def rule_2(n: int, device: torch.device) -> torch.Tensor:
    return keep_mask(mask_key(0, 0, "w"), DENSITY, 0, n, device)


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
