"""Time merge.py per method on a synthetic family; compare with mergekit when it is available.

Every method runs from a YAML config written from its recipe (yaml_recipe.config_of), so both
tools merge the same thing: ours with `merge.py --config`, mergekit, for the methods it has, with
the same config less this toolkit's own keys. Prints wall time, the child's peak RSS (os.wait4)
and input GB/s for every run, the median of --repeats interleaved runs, and, when --mergekit
points at a `mergekit-yaml` executable (a separate virtualenv; never a dependency),
our/mergekit ratios. Also times a plain read-add-write loop over the same tensors
(bench/plain_loop.py) as the floor for task_arithmetic. --dry-run writes and prints the configs
without running anything.

    python bench/make_family.py --out bench_out/family
    python bench/bench_merge.py --family bench_out/family --mergekit /path/venv/bin/mergekit-yaml
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.plain_loop import DONE_FILE as PLAIN_LOOP_DONE  # noqa: E402
from checkpoints.errors import UserError  # noqa: E402
from checkpoints.output import check_apart_from_inputs  # noqa: E402
from checkpoints.record import RECIPE_FILE  # noqa: E402
from merging_methods.mergekit_config import MergeConfig, Source, to_yaml  # noqa: E402
from merging_methods.mergekit_methods import IN_MERGEKIT  # noqa: E402
from merging_methods.recipe import MergeRecipe  # noqa: E402
from merging_methods.registry import METHODS as REGISTRY, declared_params  # noqa: E402
from merging_methods.yaml_recipe import config_of  # noqa: E402

METHODS = sorted(REGISTRY)
MERGEKIT_KEYS = {p.mergekit for p in declared_params().values() if p.mergekit}
# the file each tool leaves in its output: a folder is deleted before a rerun only if it holds one
OUTPUT_MARKERS = (RECIPE_FILE, "mergekit_config.yml", PLAIN_LOOP_DONE)


def check_outputs(outs: list[Path], family: Path) -> None:
    """Exit with one line when an output folder would be, contain or lie inside the family (the
    inputs) or hold the working directory; checked before anything is written."""
    try:
        for out in outs:
            check_apart_from_inputs(out, [family], "--work")
    except UserError as err:
        raise SystemExit(str(err)) from None


def remove_output(out: Path, family: Path) -> None:
    """Delete `out` when it is an earlier output of a benchmarked tool (it holds one of
    OUTPUT_MARKERS) and lies apart from the family and the working directory; anything else
    under that name is refused, never deleted, so a --work pointing at a user's folder costs
    nothing."""
    check_outputs([out], family)
    if not out.exists():
        return
    if not any((out / marker).is_file() for marker in OUTPUT_MARKERS):
        raise SystemExit(f"{out} exists and is not an output of this benchmark (none of "
                         f"{', '.join(OUTPUT_MARKERS)}); move it or choose another --work")
    shutil.rmtree(out)


def run_child(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run cmd; return (wall seconds, peak RSS in GiB) of that child alone."""
    wall, rss, _ = run_child_usage(cmd, env)
    return wall, rss


def run_child_usage(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """Run cmd; return (wall seconds, peak RSS in GiB, user + system CPU seconds) of that child
    alone. The CPU time moves less than the wall time when this shared machine's speed drifts."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime   # KiB -> GiB


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


def bench_recipe(family: Path, method: str, experts: list[str], density: float,
                 dtype: str = "bfloat16") -> MergeRecipe:
    """The benchmarked merge of `method`: its typical setting on this family, `dtype` output."""
    spec = REGISTRY[method]
    models = experts[:spec.others[1] or len(experts)]
    names = set(spec.params)
    params = {"density": density} if "density" in names else {}
    if "rescale_mode" in names:
        params["rescale_mode"] = "l1"   # mergekit 0.1.5's only rescale (§19.3)
    if "task_model" in names:
        params["task_model"] = models[0]
    if method == "nearswap":
        params["t"] = 1e-3   # required: no default (§19.8)
    layer_ranges = None
    if spec.stacks_layers:   # a frankenmerge: the first half of one, the second of the next
        depth = json.loads((family / "base" / "config.json").read_text())["num_hidden_layers"]
        models, layer_ranges = experts[:2], ((0, depth // 2), (depth // 2, depth))
    return MergeRecipe(method=method, base_model=str(family / "base"), models=tuple(models),
                       save_path="unused", params=params, dtype=dtype,
                       layer_ranges=layer_ranges)


def mergekit_config(config: MergeConfig) -> MergeConfig | None:
    """The config less this toolkit's own keys, for the methods mergekit has (else None)."""
    if config.merge_method not in IN_MERGEKIT:
        return None

    def keep(params):
        return {k: v for k, v in params.items() if k in MERGEKIT_KEYS}

    def source(s: Source) -> Source:
        return dataclasses.replace(s, parameters=keep(s.parameters))

    # no tokenizer_source: mergekit then copies the base's tokenizer files as they are (what
    # `base` means for us), while `base` would make it load the synthetic family's tokenizer
    return dataclasses.replace(
        config, seed=None, tokenizer_source=None, parameters=keep(config.parameters),
        models=config.models and tuple(map(source, config.models)),
        slices=config.slices and tuple(dataclasses.replace(p, sources=tuple(map(source, p.sources)))
                                       for p in config.slices))


def write_configs(family: Path, method: str, experts: list[str], density: float,
                  work: Path, dtype: str = "bfloat16") -> tuple[Path, Path | None]:
    """(our config, mergekit's config or None) for `method`, written under `work`."""
    config = config_of(bench_recipe(family, method, experts, density, dtype))
    ours = work / f"ours_{method}.yml"
    ours.write_text(to_yaml(config))
    theirs = mergekit_config(config)
    if theirs is None:
        return ours, None
    path = work / f"mergekit_{method}.yml"
    path.write_text(to_yaml(theirs))
    return ours, path


def ours_cmd(config: Path, out: Path, threads: int | None, device: str = "cpu") -> list[str]:
    cmd = [sys.executable, str(REPO / "merge.py"), "--config", str(config),
           "--save_path", str(out), "--overwrite", "--device", device]
    return cmd + (["--threads", str(threads)] if threads else [])


def mergekit_cmd(exe: str, config: Path, out: Path) -> list[str]:
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
    ap.add_argument("--dry-run", action="store_true",
                    help="write and print every method's configs; run nothing")
    args = ap.parse_args(argv)

    family = Path(args.family).resolve()
    work = Path(args.work).resolve()
    methods = args.methods.split(",")
    check_outputs([work / "plain_out", *(work / f"{tool}_{m}" for m in methods
                                          for tool in ("ours", "mergekit"))], family)
    work.mkdir(parents=True, exist_ok=True)
    experts = [str(family / f"expert{i}") for i in range(1, args.experts + 1)]
    configs = {m: write_configs(family, m, experts, args.density, work) for m in methods}
    if args.dry_run:
        for method, (ours, theirs) in configs.items():
            print(f"# {method}: {ours}" + (f", mergekit: {theirs}" if theirs else ""))
            print(ours.read_text())
        return 0
    files = input_files(family, args.experts)
    gb_in = sum(f.stat().st_size for f in files) / 1e9
    print(f"family {family}: {gb_in:.2f} GB of input shards, {args.experts} experts, "
          f"density {args.density}, {os.cpu_count()} CPUs")

    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}

    def timed(tool: str, method: str, cmd: list[str], out: Path) -> None:
        remove_output(out, family)
        os.sync()   # no earlier run's output is written back to disk during this one
        warm_page_cache(files)
        wall, rss, cpu = run_child_usage(cmd)
        remove_output(out, family)   # one output on disk at a time: each is a model's size
        runs.setdefault((tool, method), []).append((wall, rss, cpu))
        print(f"  {tool} {method}: {wall:.1f} s, {rss:.2f} GiB, CPU {cpu:.1f} s", flush=True)

    plain_out = work / "plain_out"
    plain = [sys.executable, str(REPO / "bench" / "plain_loop.py"), str(family / "base"),
             *experts, str(plain_out)]
    for _ in range(args.repeats):
        timed("plain loop", "task_arithmetic", plain, plain_out)
        for method, (ours, theirs) in configs.items():
            out = work / f"ours_{method}"
            timed("ours", method, ours_cmd(ours, out, args.threads), out)
            if args.mergekit and theirs is not None:
                out = work / f"mergekit_{method}"
                timed("mergekit", method, mergekit_cmd(args.mergekit, theirs, out), out)

    print("\n| tool | method | wall s | peak RSS GiB | CPU s | input GB/s | wall ratio | "
          "RSS ratio | CPU ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (tool, method), values in runs.items():
        wall, rss, cpu = (statistics.median(v[k] for v in values) for k in range(3))
        ratios = ["", "", ""]
        ref = runs.get(("mergekit", method))
        if tool == "ours" and ref:
            ratios = [f"{ours / statistics.median(v[k] for v in ref):.2f}"
                      for k, ours in enumerate((wall, rss, cpu))]
        print(f"| {tool} | {method} | {wall:.1f} | {rss:.2f} | {cpu:.1f} | {gb_in / wall:.2f} | "
              f"{' | '.join(ratios)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
