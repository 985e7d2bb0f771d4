"""Compare merge.py's outputs with mergekit 0.1.5's, tensor by tensor, for every method both have.

Every method both tools register (mergekit_methods.IN_MERGEKIT) merges the family from one YAML
config written as bench/bench_merge.py writes it (`merge.py --config` for us, the same file less
our own keys for mergekit), in the family's own dtype. Deterministic methods: the largest
absolute and relative difference over all tensors (relative to the largest |value| of
mergekit's tensor) and the worst tensor. Random methods (dare_*, della*; their masks differ by
design, ALGORITHMS.md §20.2): statistics of the merged delta (output - base) instead, the
fraction of entries it changes and the ratio of its L2 norms, ours over mergekit's. Both: whether
config.json agrees on CONFIG_FIELDS. Prints a markdown table and writes it as
WORK/mergekit_parity.json. mergekit is a separate virtualenv (`--mergekit`), never a dependency.

    python bench/make_family.py --out bench_out/parity32 --hidden 256 --layers 4 \
        --intermediate 688 --vocab 1000 --dtype float32
    python bench/mergekit_parity.py --family bench_out/parity32 --mergekit /venv/bin/mergekit-yaml
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_merge import (check_outputs, mergekit_cmd, ours_cmd, remove_output, run_child,  # noqa: E402
                               write_configs)
from checkpoints.checkpoint import CheckpointReader, dtype_name  # noqa: E402
from merging_methods.mergekit_methods import IN_MERGEKIT  # noqa: E402
from merging_methods.registry import METHODS as REGISTRY  # noqa: E402

SHARED = sorted(IN_MERGEKIT & set(REGISTRY))
CONFIG_FIELDS = ("num_hidden_layers", "vocab_size", "torch_dtype")
RESULT_FILE = "mergekit_parity.json"
REL_TOL = 1e-5   # beyond float32 rounding of a few operations: an entry that really differs
Tensors = Callable[[str], torch.Tensor]   # tensor name -> that tensor


def tensor_diff(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float, int]:
    """(max |ours - theirs|, that over max |theirs|, how many entries differ by more than
    REL_TOL of max |theirs|), in float64 (exact for the stored dtypes)."""
    a, b = ours.double(), theirs.double()
    scale = max(b.abs().max().item(), 1e-30)
    diff = (a - b).abs()
    max_abs = diff.max().item()
    return max_abs, max_abs / scale, int((diff > REL_TOL * scale).sum().item())


def delta_stats(ours: torch.Tensor, theirs: torch.Tensor,
                base: torch.Tensor) -> tuple[int, int, float, float]:
    """(how many entries our output changes from the base, the same for mergekit's, L2 norm of
    our merged delta, of mergekit's): the statistics random masks leave comparable."""
    d_ours, d_theirs = ours.double() - base.double(), theirs.double() - base.double()
    return (int((d_ours != 0).sum().item()), int((d_theirs != 0).sum().item()),
            d_ours.norm().item(), d_theirs.norm().item())


def compare_exact(names: Iterable[str], ours: Tensors, theirs: Tensors) -> dict:
    """The largest absolute and relative differences over `names`, the tensor of each (None
    when nothing differs) and the count of entries beyond REL_TOL."""
    diffs = {}
    for name in names:
        tensor = ours(name)
        diffs[name] = (*tensor_diff(tensor, theirs(name)), tensor.numel())
    worst_abs = max(diffs, key=lambda n: diffs[n][0])
    worst_rel = max(diffs, key=lambda n: diffs[n][1])
    return {"kind": "exact", "max_abs": diffs[worst_abs][0], "max_rel": diffs[worst_rel][1],
            "worst_abs": worst_abs if diffs[worst_abs][0] > 0 else None,
            "worst_rel": worst_rel if diffs[worst_rel][1] > 0 else None,
            "entries_over_tol": sum(d[2] for d in diffs.values()),
            "entries": sum(d[3] for d in diffs.values())}


def compare_statistics(names: Iterable[str], ours: Tensors, theirs: Tensors,
                       base: Tensors) -> dict:
    """The fractions of entries each output changes from the base (over all tensors; the largest
    per-tensor gap and its tensor) and the L2-norm ratio of the merged deltas, ours over
    mergekit's: overall and its range over tensors."""
    stats = {}
    for name in names:
        tensor = ours(name)
        stats[name] = (*delta_stats(tensor, theirs(name), base(name)), tensor.numel())

    def gap(name: str) -> float:
        changed_ours, changed_theirs, _, _, size = stats[name]
        return abs(changed_ours - changed_theirs) / size

    worst = max(stats, key=gap)
    entries = sum(s[4] for s in stats.values())
    ratios = [s[2] / max(s[3], 1e-30) for s in stats.values()]
    overall = (sum(s[2] ** 2 for s in stats.values()) /
               max(sum(s[3] ** 2 for s in stats.values()), 1e-30)) ** 0.5
    return {"kind": "statistics",
            "changed_ours": sum(s[0] for s in stats.values()) / entries,
            "changed_mergekit": sum(s[1] for s in stats.values()) / entries,
            "max_changed_gap": gap(worst), "worst_gap": worst,
            "l2_ratio": overall, "l2_ratio_min": min(ratios), "l2_ratio_max": max(ratios)}


def config_mismatches(ours: dict, theirs: dict) -> dict[str, list]:
    """CONFIG_FIELDS whose values differ: field -> [ours, mergekit's]; a transformers-5 `dtype`
    key stands for an absent or empty `torch_dtype`."""
    def value(config: dict, key: str) -> object:
        return config.get(key) or config.get("dtype") if key == "torch_dtype" else config.get(key)
    return {k: [value(ours, k), value(theirs, k)] for k in CONFIG_FIELDS
            if value(ours, k) != value(theirs, k)}


def compare_outputs(ours_dir: Path, theirs_dir: Path, base_dir: Path, stochastic: bool) -> dict:
    """One method's record: the tensor comparison (statistics for a `stochastic` method), the
    tensors only one side wrote, the config fields that differ."""
    ours = CheckpointReader(ours_dir, "ours")
    theirs = CheckpointReader(theirs_dir, "mergekit")
    names = [n for n in ours.names if n in theirs.info]
    if stochastic:
        base = CheckpointReader(base_dir, "base")
        result = compare_statistics(names, ours.get, theirs.get, base.get)
    else:
        result = compare_exact(names, ours.get, theirs.get)
    return {**result, "tensors": len(names),
            "only_ours": sorted(set(ours.names) - set(theirs.names)),
            "only_mergekit": sorted(set(theirs.names) - set(ours.names)),
            "config_mismatches": config_mismatches(ours.config, theirs.config)}


def family_experts(family: Path) -> list[str]:
    """The family's expert folders, expert1, expert2, ... (bench/make_family.py's names)."""
    experts = []
    while (family / f"expert{len(experts) + 1}").is_dir():
        experts.append(str(family / f"expert{len(experts) + 1}"))
    return experts


def parity_configs(family: Path, methods: list[str], density: float,
                   work: Path) -> dict[str, tuple[Path, Path]]:
    """method -> (our config, mergekit's), both written under `work` in the family's dtype, so
    neither tool casts (mergekit then computes in that dtype, §18.9)."""
    unknown = sorted(set(methods) - set(SHARED))
    if unknown:
        raise SystemExit(f"--methods: {', '.join(unknown)} is not a method both tools have; "
                         f"choose from {', '.join(SHARED)}")
    dtype = dtype_name(CheckpointReader(family / "base", "--family").stored_dtype)
    experts = family_experts(family)
    if not experts:
        raise SystemExit(f"--family: {family} has no expert1 folder; write the family with "
                         "bench/make_family.py")
    return {m: write_configs(family, m, experts, density, work, dtype) for m in methods}


def table(results: dict[str, dict]) -> str:
    """The results as one markdown table: exact rows give differences, random rows statistics."""
    lines = [f"| method | compared | max abs diff | max rel diff | entries beyond {REL_TOL:g} "
             "rel | worst tensor | changed fraction ours / mergekit | L2 ratio ours/mergekit | "
             "config.json |", "|---|---|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        config = "agrees" if not r["config_mismatches"] else json.dumps(r["config_mismatches"])
        if r["only_ours"] or r["only_mergekit"]:
            config += f"; tensors only ours {len(r['only_ours'])}, only mergekit " \
                      f"{len(r['only_mergekit'])}"
        if r["kind"] == "exact":
            cells = [f"{r['max_abs']:.3g}", f"{r['max_rel']:.3g}",
                     f"{r['entries_over_tol']} of {r['entries']}", r["worst_abs"] or "-", "", ""]
        else:
            cells = ["-", "-", "-", r["worst_gap"],
                     f"{r['changed_ours']:.4f} / {r['changed_mergekit']:.4f} "
                     f"(max gap {r['max_changed_gap']:.4f})",
                     f"{r['l2_ratio']:.4f} (tensors {r['l2_ratio_min']:.3f}-"
                     f"{r['l2_ratio_max']:.3f})"]
        kind = "every entry" if r["kind"] == "exact" else "statistics (random masks)"
        lines.append(f"| {method} | {kind} | " + " | ".join(cells) + f" | {config} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True, help="folder written by bench/make_family.py")
    ap.add_argument("--mergekit", required=True, help="path to a mergekit-yaml executable")
    ap.add_argument("--methods", default=",".join(SHARED))
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--work", default="bench_out/parity")
    args = ap.parse_args(argv)

    family = Path(args.family).resolve()
    work = Path(args.work).resolve()
    methods = args.methods.split(",")
    check_outputs([work / f"{tool}_{m}" for m in methods for tool in ("ours", "mergekit")],
                  family)
    work.mkdir(parents=True, exist_ok=True)
    configs = parity_configs(family, methods, args.density, work)
    results = {}
    for method, (ours_config, theirs_config) in configs.items():
        ours, theirs = work / f"ours_{method}", work / f"mergekit_{method}"
        for out, cmd in ((ours, ours_cmd(ours_config, ours, None)),
                         (theirs, mergekit_cmd(args.mergekit, theirs_config, theirs))):
            remove_output(out, family)
            run_child(cmd)
        results[method] = compare_outputs(ours, theirs, family / "base",
                                          REGISTRY[method].stochastic)
        print(f"  {method}: done", flush=True)
    print(table(results))
    (work / RESULT_FILE).write_text(json.dumps(
        {"family": str(family), "density": args.density, "results": results}, indent=2) + "\n")
    print(f"wrote {work / RESULT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
