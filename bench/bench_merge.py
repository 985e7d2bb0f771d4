"""Time merge.py per method on a synthetic family; compare with mergekit when it is available.

Prints wall time, the child's peak RSS (os.wait4) and input GB/s for every run, the median of
--repeats interleaved runs, and, when --mergekit points at a `mergekit-yaml` executable (a
separate virtualenv; never a dependency), our/mergekit ratios. Also times a plain
read-add-write loop over the same tensors (bench/plain_loop.py) as the floor for
task_arithmetic.

    python bench/make_family.py --out bench_out/family
    python bench/bench_merge.py --family bench_out/family --mergekit /path/venv/bin/mergekit-yaml
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "widen"]
MERGEKIT_METHODS = {"task_arithmetic", "ties", "dare_linear", "dare_ties"}


def run_child(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run cmd; return (wall seconds, peak RSS in GiB) of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss / 2**20   # KiB -> GiB


def input_files(family: Path, n_experts: int) -> list[Path]:
    folders = [family / "base"] + [family / f"expert{i}" for i in range(1, n_experts + 1)]
    return [f for d in folders for f in sorted(d.glob("*.safetensors"))]


def warm_page_cache(files: list[Path]) -> None:
    """Read every input once, so each tool starts from page cache (this machine's kernel
    reclaims idle page cache proactively, so files read minutes ago may be gone)."""
    for f in files:
        with open(f, "rb") as handle:
            while handle.read(64 << 20):
                pass


def ours_cmd(family: Path, method: str, experts: list[str], out: Path, density: float,
             threads: int | None, device: str = "cpu") -> list[str]:
    cmd = [sys.executable, str(REPO / "merge.py"), "--method", method,
           "--base_model", str(family / "base"), "--models_to_merge", ",".join(experts),
           "--save_path", str(out), "--overwrite", "--device", device]
    if method in ("ties", "dare_linear", "dare_ties"):
        cmd += ["--density", str(density)]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def mergekit_cmd(exe: str, family: Path, method: str, experts: list[str], out: Path,
                 density: float, work: Path) -> list[str]:
    params = {"weight": 1.0}
    if method != "task_arithmetic":
        params["density"] = density
    lines = [f"merge_method: {method}", f"base_model: {family / 'base'}", "dtype: bfloat16",
             "models:"]
    for e in experts:
        lines += [f"  - model: {e}", "    parameters:"]
        lines += [f"      {k}: {v}" for k, v in params.items()]
    config = work / f"mergekit_{method}.yml"
    config.write_text("\n".join(lines) + "\n")
    return [exe, str(config), str(out), "--out-shard-size", "5B", "--lazy-unpickle"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True, help="folder written by bench/make_family.py")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="passed to merge.py --threads")
    ap.add_argument("--mergekit", default=None, help="path to a mergekit-yaml executable")
    ap.add_argument("--work", default="bench_out/work")
    args = ap.parse_args(argv)

    family = Path(args.family).resolve()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    experts = [str(family / f"expert{i}") for i in range(1, args.experts + 1)]
    files = input_files(family, args.experts)
    gb_in = sum(f.stat().st_size for f in files) / 1e9
    print(f"family {family}: {gb_in:.2f} GB of input shards, {args.experts} experts, "
          f"density {args.density}, {os.cpu_count()} CPUs")

    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def timed(tool: str, method: str, cmd: list[str], out: Path) -> None:
        if out.exists():
            shutil.rmtree(out)
        warm_page_cache(files)
        wall, rss = run_child(cmd)
        runs.setdefault((tool, method), []).append((wall, rss))
        print(f"  {tool} {method}: {wall:.1f} s, {rss:.2f} GiB", flush=True)

    plain_out = work / "plain_out"
    plain = [sys.executable, str(REPO / "bench" / "plain_loop.py"), str(family / "base"),
             *experts, str(plain_out)]
    for _ in range(args.repeats):
        timed("plain loop", "task_arithmetic", plain, plain_out)
        for method in args.methods.split(","):
            out = work / f"ours_{method}"
            timed("ours", method, ours_cmd(family, method, experts, out, args.density,
                                           args.threads), out)
            if args.mergekit and method in MERGEKIT_METHODS:
                out = work / f"mergekit_{method}"
                timed("mergekit", method, mergekit_cmd(args.mergekit, family, method, experts,
                                                       out, args.density, work), out)

    print(f"\n| tool | method | wall s | peak RSS GiB | input GB/s | wall ratio | RSS ratio |")
    print("|---|---|---|---|---|---|---|")
    for (tool, method), values in runs.items():
        wall = statistics.median(v[0] for v in values)
        rss = statistics.median(v[1] for v in values)
        ratio_w = ratio_r = ""
        ref = runs.get(("mergekit", method))
        if tool == "ours" and ref:
            ratio_w = f"{wall / statistics.median(v[0] for v in ref):.2f}"
            ratio_r = f"{rss / statistics.median(v[1] for v in ref):.2f}"
        print(f"| {tool} | {method} | {wall:.1f} | {rss:.2f} | {gb_in / wall:.2f} | "
              f"{ratio_w} | {ratio_r} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
