"""The floor for task arithmetic: read every tensor, add the deltas in float32, write shards.

No checks, no planning, no progress bar: just safetensors in, one float32 accumulator,
safetensors out (one file per input shard), so bench_merge.py can say how close merge.py
gets to the cost of the data movement itself.

    python bench/plain_loop.py BASE EXPERT1 [EXPERT2 ...] OUT
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DONE_FILE = "plain_loop.txt"


def main(argv: list[str]) -> int:
    *inputs, out = [Path(a) for a in argv]
    out.mkdir(parents=True, exist_ok=True)
    base_dir, experts = inputs[0], inputs[1:]
    torch.set_num_threads(1)
    with torch.inference_mode():
        for shard in sorted(base_dir.glob("*.safetensors")):
            handles = [safe_open(str(d / shard.name), "pt") for d in experts]
            result = {}
            with safe_open(str(shard), "pt") as base:
                for name in base.keys():
                    b = base.get_tensor(name).float()
                    acc = b.clone()
                    for h in handles:
                        acc.add_(h.get_tensor(name).float()).sub_(b)
                    result[name] = acc.to(torch.bfloat16)
            save_file(result, str(out / shard.name), metadata={"format": "pt"})
    (out / DONE_FILE).write_text("written by bench/plain_loop.py\n")  # marks the folder ours
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
