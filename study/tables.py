"""The study's markdown: the paper-style table, the AIM effect by method, the ablation, the statistics.

Main table: `evaluation.report.build_table` over the population (base + experts) and every merge
with and without AIM at the main omega, plus a `skill_mean` column (mean of the three skill
scores). HV is computed over the three skills only, with the reference point `--hv-margin`
population ranges below the population's worst score. Perplexity is shown beside them but left
out of HV: nearly every merge's perplexity is worse than every population model's, so on that
axis it would add nothing at all (see `evaluation.pareto`), and with margin 0 neither would any
2-expert merge, which sits at the population's floor on its third skill.
"""
from __future__ import annotations

from pathlib import Path
from statistics import geometric_mean, mean

from evaluation.report import Table, build_table, pct_change
from study.families import Family
from study.grid import MODES, Variant
from study.run import ZooResults

SKILL_MEAN = "skill_mean"


def with_skill_mean(record: dict, skills: tuple[str, ...]) -> dict:
    """A copy of a result record with a `skill_mean` score (mean of the `skills` benchmarks)."""
    value = mean(record["scores"][b] for b in skills)
    head = {"task": SKILL_MEAN, "metric": "mean exact_match", "value": value,
            "higher_is_better": True, "n_shot": 0, "n_samples": 0}
    return {**record, "scores": {**record["scores"], SKILL_MEAN: value},
            "headline": {**record["headline"], SKILL_MEAN: head}}


def main_table(res: ZooResults, omega: float, hv_margin: float = 0.0) -> Table:
    """Population, then each merge without AIM, with AIM at `omega`, and the % change."""
    merged = []
    for label, rows in res.variants.items():
        merged.append(res.records[label])
        merged += [res.records[v_label] for v, v_label in rows if v == Variant("aim", omega)]
    skills = res.family.skills
    return build_table([with_skill_mean(r, skills) for r in res.population],
                       [with_skill_mean(r, skills) for r in merged], hv_benchmarks=list(skills),
                       hv_margin=hv_margin)


def _point(record: dict, family: Family) -> tuple[float, float]:
    """(skill mean, perplexity) of a result record."""
    return with_skill_mean(record, family.skills)["scores"][SKILL_MEAN], record["scores"][family.ppl]


def aim_effect_markdown(res: ZooResults, table: Table, omega: float) -> str:
    """Per method, weight regime and merge size: mean skill, perplexity and HV gain, no AIM -> AIM."""
    gains = {r.label: r.gain or 0.0 for r in table.rows if r.kind in ("merge", "aim")}
    groups: dict[tuple[str, float | None, int], list[tuple[str, str]]] = {}
    for label, rows in res.variants.items():
        job = res.jobs[label]
        for variant, v_label in rows:
            if variant == Variant("aim", omega):
                groups.setdefault((job.method, job.weight, len(job.experts)), []).append((label, v_label))
    lines = [f"| method | weight | experts | merges | skill mean: no AIM → AIM {omega:g} | "
             f"{res.family.ppl} (geo. mean): no AIM → AIM | HV gain: no AIM → AIM |",
             "|---|---|---|---|---|---|---|"]
    for (method, weight, size), pairs in groups.items():
        plain = [_point(res.records[p], res.family) for p, _ in pairs]
        aimed = [_point(res.records[a], res.family) for _, a in pairs]
        lines.append(f"| {method} | {'-' if weight is None else f'{weight:g}'} | {size} | {len(pairs)} | "
                     f"{mean(s for s, _ in plain):.3f} → {mean(s for s, _ in aimed):.3f} | "
                     f"{geometric_mean(p for _, p in plain):.3f} → "
                     f"{geometric_mean(p for _, p in aimed):.3f} | "
                     f"{mean(gains[p] for p, _ in pairs):.4f} → {mean(gains[a] for _, a in pairs):.4f} |")
    return "\n".join(lines)


def sweep_points(res: ZooResults) -> dict[str, dict[str, dict[float, tuple[float, float]]]]:
    """{merge: {mode: {omega: (skill mean, ppl)}}} for merges with more than one variant.

    omega = 1 is the merge itself (every mode leaves the weights unchanged there).
    """
    out: dict[str, dict[str, dict[float, tuple[float, float]]]] = {}
    for label, rows in res.variants.items():
        if len(rows) < 2:
            continue
        plain = _point(res.records[label], res.family)
        out[label] = {}
        for variant, v_label in rows:
            out[label].setdefault(variant.mode, {1.0: plain})[variant.omega] = _point(res.records[v_label], res.family)
    return out


def ablation_markdown(res: ZooResults) -> str:
    """Rows: merge x variant; columns: omega; cells: `skill mean / perplexity`."""
    points = sweep_points(res)
    if not points:
        return "(no merge ran with the controls)"
    omegas = sorted({w for modes in points.values() for p in modes.values() for w in p}, reverse=True)
    head = ["merge", "variant", *(f"ω={w:g}" + (" (no AIM)" if w == 1.0 else "") for w in omegas)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, modes in points.items():
        for i, mode in enumerate(m for m in MODES if m in modes):
            cells = [f"{modes[mode][w][0]:.3f} / {modes[mode][w][1]:.3f}" if w in modes[mode] else ""
                     for w in omegas]
            lines.append("| " + " | ".join([label if i == 0 else "", mode, *cells]) + " |")
    return "\n".join(lines)


def control_summary_markdown(res: ZooResults) -> str:
    """Per omega and control, over the swept merges: mean skill difference AIM - control, the
    geometric mean perplexity ratio AIM / control, and how often one is better on both."""
    points = sweep_points(res)
    if not points:
        return "(no merge ran with the controls)"
    omegas = sorted({w for modes in points.values() for w in modes.get("aim", {}) if w != 1.0})
    lines = [f"| ω | control | merges | Δ skill mean (AIM − control) | {res.family.ppl} AIM / control "
             "(geo. mean) | AIM better on both | control better on both |",
             "|---|---|---|---|---|---|---|"]
    for control in (m for m in MODES if m != "aim"):
        for w in omegas:
            pairs = [(modes["aim"][w], modes[control][w]) for modes in points.values()
                     if w in modes.get("aim", {}) and w in modes.get(control, {})]
            if not pairs:
                continue
            d_skill = [a[0] - c[0] for a, c in pairs]
            ratio = [a[1] / c[1] for a, c in pairs]
            aim_wins = sum(s > 0 and r < 1 for s, r in zip(d_skill, ratio))
            control_wins = sum(s < 0 and r > 1 for s, r in zip(d_skill, ratio))
            lines.append(f"| {w:g} | {control} | {len(pairs)} | {mean(d_skill):+.4f} | "
                         f"{geometric_mean(ratio):.4f} | {aim_wins} | {control_wins} |")
    return "\n".join(lines)


def stat_ratios(stats_path: str | Path) -> dict[str, float]:
    """max / median of each module's base statistic (per input channel), from a stats file."""
    from aim.stats_io import load_stats

    stats, _ = load_stats(stats_path)
    return {name: (s.abs().max() / s.abs().median().clamp(min=1e-12)).item()
            for name, s in stats.stats.items()}


def top_channels(stats_path: str | Path, k: int) -> dict[str, list[int]]:
    """The `k` input channels with the largest statistic, per module."""
    from aim.stats_io import load_stats

    stats, _ = load_stats(stats_path)
    return {name: sorted(s.abs().topk(min(k, s.numel())).indices.tolist())
            for name, s in stats.stats.items()}


def planted_line(top: dict[str, list[int]], planted: list[int]) -> str:
    """Which modules' largest-statistic channels are exactly the planted outlier channels."""
    hits = [short_module(name) for name, channels in top.items() if channels == sorted(planted)]
    return (f"planted outlier channels {sorted(planted)} are exactly the {len(planted)} largest "
            f"channels of the base's statistic in {len(hits)} of {len(top)} modules"
            + (f" ({', '.join(hits)})" if hits else ""))


def short_module(name: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `layers.0.self_attn.q_proj`."""
    return name.removeprefix("model.").removesuffix(".weight")


def stats_markdown(ratios: dict[str, dict[str, float]]) -> str:
    """One row per module, one column per zoo: max / median of the base's channel statistic."""
    zoos = list(ratios)
    modules = list(dict.fromkeys(m for r in ratios.values() for m in r))
    lines = ["| module | " + " | ".join(f"{z}: max/median" for z in zoos) + " |",
             "|---|" + "---|" * len(zoos)]
    for module in modules:
        cells = [f"{ratios[z][module]:.1f}" if module in ratios[z] else "" for z in zoos]
        lines.append(f"| {short_module(module)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def standard_error(p: float, n: int) -> float:
    """Standard error of a share `p` of `n` independent pass/fail prompts."""
    return (p * (1 - p) / n) ** 0.5 if n else float("nan")


def scores_markdown(res: ZooResults) -> str:
    """Every evaluated model's scores, each pass/fail score with its standard error (± 1 SE)."""
    family = res.family
    rates = (*family.skills, *family.general)
    lines = ["| model | " + " | ".join(rates) + f" | {family.ppl} |", "|---|" + "---|" * (len(rates) + 1)]
    for record in [*res.population, *res.records.values()]:
        cells = []
        for bench in rates:
            p, n = record["scores"][bench], record["headline"][bench]["n_samples"]
            cells.append(f"{p:.3f} ± {standard_error(p, n):.3f}")
        lines.append(f"| {record['label']} | " + " | ".join(cells) + f" | {record['scores'][family.ppl]:.3f} |")
    return "\n".join(lines)
