"""The steps of bench/gpu_check.sh, one subcommand each; each prints its own summary lines.

    python bench/gpu_check.py masks  --device cuda
    python bench/gpu_check.py merges --device cuda --family bench_out/family --work bench_out/gpu
    python bench/gpu_check.py aim    --device cuda --work bench_out/gpu
    python bench/gpu_check.py vllm   --work bench_out/gpu      (exit 3: vLLM is not installed)

`--device cpu` runs the same steps on the CPU (the script's --cpu-dry-run): the "device" column
is then a second CPU run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_merge import ours_cmd, remove_output, run_child, write_configs  # noqa: E402
from merging_methods.primitives import keep_mask, mask_key  # noqa: E402
from merging_methods.registry import METHODS  # noqa: E402

SKIPPED = 3  # exit status of a step whose optional dependency is missing
# merge.py in a child that also leaves its peak GPU memory (torch's allocator) in $PEAK_FILE
CHILD = ("import os, sys, torch, merge; rc = merge.main(sys.argv[1:]); "
         "open(os.environ['PEAK_FILE'], 'w').write(str(torch.cuda.max_memory_allocated() "
         "if torch.cuda.is_available() else 0)); sys.exit(rc)")
MASK_CASES = [  # (seed, model, tensor name, density, first element, elements)
    (0, 0, "model.embed_tokens.weight", 0.5, 0, 1 << 26),
    (7, 2, "model.layers.3.mlp.down_proj.weight", 0.3, 12_345_677, 5_000_003),
    (1, 1, "lm_head.weight", 0.999, 3, 1_000_001),
    (2**40, 5, "model.norm.weight", 1 / 65536, 0, 4097),
]


def check_masks(device: str) -> bool:
    """Mask rule 2 on `device` against the CPU, bit for bit, on large and unaligned ranges."""
    same = True
    for seed, index, name, density, start, n in MASK_CASES:
        key = mask_key(seed, index, name)
        equal = torch.equal(keep_mask(key, density, start, n, device).cpu(),
                            keep_mask(key, density, start, n))
        same &= equal
        print(f"  mask {name} seed {seed} model {index} p={density:g} [{start}, {start + n}): "
              f"{'equal' if equal else 'DIFFERENT'}")
    print(f"masks: {device} {'==' if same else '!='} cpu bit for bit on {len(MASK_CASES)} ranges")
    return same


def _shards(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def compare_outputs(a: Path, b: Path) -> str:
    """'bit-equal' or the share of differing elements and the largest |difference|."""
    left, right = _shards(a), _shards(b)
    if left.keys() != right.keys():
        return "DIFFERENT tensor names"
    differing = total = 0
    worst = 0.0
    for name, x in left.items():
        y = right[name]
        diff = x.float() != y.float()
        differing += int(diff.sum())
        total += x.numel()
        if diff.any():
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    return "bit-equal" if not differing else f"{differing / total:.2%} differ, max |diff| {worst:.3g}"


def timed_merge(family: Path, method: str, out: Path, device: str, experts: list[str]
                ) -> tuple[float, float, float]:
    """(wall s, peak RSS GiB, peak GPU GiB) of merge.py in a child process."""
    config, _ = write_configs(family, method, experts, 0.5, out.parent)
    cmd = [sys.executable, "-c", CHILD, *ours_cmd(config, out, None, device)[2:]]
    with tempfile.NamedTemporaryFile() as peak:
        wall, rss = run_child(cmd, {**os.environ, "PEAK_FILE": peak.name})
        return wall, rss, int(Path(peak.name).read_text() or 0) / 2**30


def run_merges(family: Path, device: str, work: Path, methods: list[str]) -> bool:
    """Every method on CPU and on `device`: times, peak memory, and whether the outputs agree."""
    experts = sorted(str(p) for p in family.glob("expert*"))
    rows, ok = [], True
    for method in methods:
        outs = {d: work / f"{method}_{d}" for d in ("cpu", "device")}
        try:
            cpu = timed_merge(family, method, outs["cpu"], "cpu", experts)
            dev = timed_merge(family, method, outs["device"], device, experts)
            agree = compare_outputs(outs["cpu"], outs["device"])
        except RuntimeError as err:
            ok = False
            rows.append(f"| {method} | FAILED: {str(err).splitlines()[0][:120]} |")
            continue
        finally:
            for out in outs.values():
                remove_output(out, family)
        rows.append(f"| {method} | {cpu[0]:.1f} | {cpu[1]:.2f} | {dev[0]:.1f} | {dev[1]:.2f} | "
                    f"{dev[2]:.2f} | {agree} |")
        print(f"  {method}: cpu {cpu[0]:.1f} s, {device} {dev[0]:.1f} s, {agree}", flush=True)
    print(f"\nmerges of {family.name} ({len(experts)} experts, density 0.5 where taken), "
          f"cpu vs {device}:")
    print(f"| method | cpu s | cpu RSS GiB | {device} s | {device} RSS GiB | {device} peak GPU GiB "
          f"| outputs |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return ok


def tiny_family(root: Path, **config) -> tuple[Path, list[Path]]:
    """A tiny Llama base with tokenizer and two fine-tunes (tests/tiny_models.py)."""
    from tests.tiny_models import build_finetune, build_llama

    base = build_llama(root / "base", seed=0, **config)
    return base, [build_finetune(base, root / f"ft{i}", seed=i, scale=0.2) for i in (1, 2)]


def run_aim(device: str, work: Path) -> bool:
    """performAIM.py on `device` (on CUDA the base loads with device_map="auto"), then the same
    relaxation on CPU: the two outputs should agree closely."""
    import merge
    import performAIM

    base, fts = tiny_family(work / "aim")
    merged = work / "aim" / "merged"
    if merge.main(["--method", "task_arithmetic", "--base_model", str(base), "--models_to_merge",
                   ",".join(map(str, fts)), "--save_path", str(merged), "--overwrite"]):
        print("aim: the task_arithmetic merge to relax failed")
        return False
    times = {}
    for where in (device, "cpu"):
        start = time.perf_counter()
        rc = performAIM.main(["--merged_model", str(merged), "--pretrained_model_name", str(base),
                              "--omega", "0.4", "--calib_data", "builtin", "--calib_samples", "8",
                              "--block_size", "512", "--device", where, "--overwrite",
                              "--save_path", str(work / "aim" / f"relaxed_{where}")])
        times[where] = time.perf_counter() - start
        if rc != 0:
            print(f"aim: performAIM.py --device {where} exited {rc}")
            return False
    agree = compare_outputs(work / "aim" / f"relaxed_{device}", work / "aim" / "relaxed_cpu")
    print(f"aim: calibration + relaxation on {device} {times[device]:.1f} s, on cpu "
          f"{times['cpu']:.1f} s; outputs: {agree}")
    return True


def run_vllm(work: Path) -> int:
    """evaluate_model.py --backend vllm on a tiny model and a local perplexity task."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm: not installed, skipped")
        return SKIPPED
    import evaluate_model
    from tests.test_evaluate import write_local_tasks

    base, _ = tiny_family(work / "vllm", hidden_size=256, intermediate_size=512,
                          max_position_embeddings=1024)
    tasks = write_local_tasks(work / "vllm" / "tasks")
    rc = evaluate_model.main(["--model", str(base), "--benchmarks", "toy_ppl", "--tasks_dir",
                              str(tasks), "--backend", "vllm", "--save_path",
                              str(work / "vllm" / "results")])
    print(f"vllm: evaluate_model.py --backend vllm exited {rc}")
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("masks", "merges", "aim", "vllm"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--family", type=Path, help="merges: a bench/make_family.py folder")
    ap.add_argument("--methods", default=",".join(sorted(METHODS)))
    ap.add_argument("--work", type=Path, default=REPO / "bench_out" / "gpu_check")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "masks":
        return 0 if check_masks(args.device) else 1
    if args.step == "merges":
        return 0 if run_merges(args.family.resolve(), args.device, args.work.resolve(),
                               args.methods.split(",")) else 1
    if args.step == "aim":
        return 0 if run_aim(args.device, args.work.resolve()) else 1
    return run_vllm(args.work.resolve())


if __name__ == "__main__":
    raise SystemExit(main())
