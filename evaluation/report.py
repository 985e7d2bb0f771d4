"""The paper-style comparison from result files: merges with and without AIM, % change, HV gain.

Rows: the population (the models the merges were made from), then per merge its run without
AIM, each AIM variant with a "% change" row (AIM vs without), then its controls. What a model is
comes from the record its folder carries (`merge_recipe.yaml`, copied into the result file as
`recipe` by `evaluation.runner.evaluate`), never from its label: a model with an `aim` record is
an AIM variant (mode `aim`) or an ablation control (the study's `channel_blind` and `uniform`
modes), and its partner without AIM is the plain merge whose `merge` record is the same merge
(`merge_key`). HV and HV gain are defined in
`evaluation.pareto`; the report's reference point is 0.1 population ranges below the population's
worst score (`DEFAULT_HV_MARGIN`), so a merge at the population's floor on one benchmark still
counts.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from evaluation.pareto import hv_gain, normalise, pareto_front, population_axes

log = logging.getLogger(__name__)

# where and how a merge was written: not part of which merge it is
NOT_IDENTITY = frozenset({"save_path", "overwrite", "device", "max_shard_size"})
DEFAULT_HV_MARGIN = 0.1  # with 0, every merge at a population model's floor on one axis adds 0


@dataclass
class Row:
    """One table row: a model's scores, or the % change of an AIM variant vs its partner."""

    kind: str                        # population | merge | aim | control | change
    label: str
    values: dict[str, float | None]  # benchmark -> score (or % change)
    hv: float | None = None
    gain: float | None = None
    partner: str | None = None       # AIM and control rows: the label of the merge without AIM


def pct_change(old: float | None, new: float | None) -> float | None:
    """100 * (new - old) / |old|; 0 when both are 0, None when old is 0 (or either is missing)."""
    if old is None or new is None:
        return None
    if old == 0:
        return 0.0 if new == 0 else None
    return 100.0 * (new - old) / abs(old)


def merge_key(record: dict) -> str | None:
    """Which merge a result's model is (or was relaxed from): its recipe's `merge` record without
    where and how it was written, as a comparable string; None when the model is no merge."""
    merge = (record.get("recipe") or {}).get("merge")
    if not merge:
        return None
    return json.dumps({k: v for k, v in merge.items() if k not in NOT_IDENTITY}, sort_keys=True)


def variant_kind(record: dict) -> str:
    """"aim" or "control" for a model carrying an `aim` record (by its mode), else "merge"."""
    aim = (record.get("recipe") or {}).get("aim")
    if aim is None:
        return "merge"
    return "aim" if aim.get("mode", "aim") == "aim" else "control"


def partners(records: list[dict]) -> dict[str, str]:
    """{label of an AIM variant or control: label of the plain merge it relaxed}, for those
    whose plain merge is among `records` (the first one, when a merge was evaluated twice)."""
    plain: dict[str, str] = {}
    for rec in records:
        key = merge_key(rec)
        if variant_kind(rec) == "merge" and key is not None:
            plain.setdefault(key, rec["label"])
    return {rec["label"]: plain[merge_key(rec)] for rec in records
            if variant_kind(rec) != "merge" and merge_key(rec) in plain}


def _latest_by_label(records: list[dict]) -> list[dict]:
    by_label: dict[str, dict] = {}
    for rec in records:
        old = by_label.get(rec["label"])
        if old is not None:
            log.warning("two result files for %s; using the newer one (%s)", rec["label"],
                        max(old["date"], rec["date"]))
        if old is None or rec["date"] >= old["date"]:
            by_label[rec["label"]] = rec
    return list(by_label.values())


def benchmark_columns(records: list[dict]) -> tuple[list[str], dict[str, bool]]:
    """Benchmarks in order of first appearance, and their direction (higher is better?)."""
    names, higher = [], {}
    for rec in records:
        for name, head in rec["headline"].items():
            if name not in higher:
                names.append(name)
                higher[name] = head["higher_is_better"]
    return names, higher


@dataclass
class Table:
    """The comparison: rows plus what the columns mean."""

    rows: list[Row]
    columns: list[str]               # benchmarks, in order of first appearance
    higher: dict[str, bool]          # benchmark -> higher is better?
    hv_benchmarks: list[str]         # the HV axes (empty: no HV)
    population: list[str]            # labels of the population models
    hv_margin: float = DEFAULT_HV_MARGIN

    def markdown(self) -> str:
        """The paper-style markdown table plus one line stating how HV was computed."""
        text = markdown_table(self.rows, self.columns, self.higher)
        if self.hv_benchmarks:
            text += (f"\n\nHV over {', '.join(self.hv_benchmarks)}: scores normalised per benchmark "
                     f"to the population ({', '.join(self.population)}; worst = 0, best = 1, "
                     "lower-is-better metrics flipped), reference point "
                     f"{-self.hv_margin or 0.0:g} on every axis; HV gain = HV(population + model) - "
                     "HV(population).")
        return text


def build_table(population: list[dict], merged: list[dict], *,
                hv_benchmarks: list[str] | None = None,
                hv_margin: float = DEFAULT_HV_MARGIN) -> Table:
    """Rows for result records (from `evaluate` or result files): population, then per merge
    its AIM runs (each with a % change row) and its controls.

    HV uses `hv_benchmarks` (default: every benchmark all records share); see `evaluation.pareto`.
    """
    population = _latest_by_label(population)
    pop_labels = [r["label"] for r in population]
    merged = _latest_by_label(merged)
    for rec in merged:
        if rec["label"] in pop_labels:
            log.warning("%s is in the population; not listed as a merge", rec["label"])
    merged = [r for r in merged if r["label"] not in pop_labels]
    columns, higher = benchmark_columns(population + merged)
    common = [b for b in columns if all(b in r["scores"] for r in population + merged)]
    hv_names = (hv_benchmarks or common) if population else []
    missing = [b for b in hv_names if b not in common]
    if missing:
        raise ValueError(f"HV benchmarks {missing} are missing from some result files")
    axes = population_axes([r["scores"] for r in population], hv_names, higher)
    pop_points = [normalise(r["scores"], axes) for r in population]

    def row(kind: str, rec: dict) -> Row:
        hv, gain = (hv_gain(normalise(rec["scores"], axes), pop_points, hv_margin)
                    if axes else (None, None))
        return Row(kind, rec["label"], {b: rec["scores"].get(b) for b in columns}, hv, gain)

    rows = [row("population", r) for r in population]
    partner = partners(merged)
    for rec in merged:
        kind = variant_kind(rec)
        if rec["label"] in partner:
            continue  # listed right after its partner below
        rows.append(row(kind, rec))
        if kind != "merge":
            continue
        base = rows[-1]
        variants = [o for o in merged if partner.get(o["label"]) == base.label]
        for other in sorted(variants, key=variant_kind):  # AIM runs, then controls
            variant = row(variant_kind(other), other)
            variant.partner = base.label
            rows.append(variant)
            if variant.kind == "aim":
                change = {b: pct_change(base.values[b], variant.values[b]) for b in columns}
                rows.append(Row("change", "", change, gain=pct_change(base.gain, variant.gain)))
    return Table(rows, columns, higher, hv_names, pop_labels, hv_margin)


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}%" if pct else f"{value:.4f}"


def markdown_table(rows: list[Row], columns: list[str], higher: dict[str, bool]) -> str:
    """The markdown table (↑ / ↓ mark each benchmark's better direction)."""
    arrows = [f"{b} {'↑' if higher[b] else '↓'}" for b in columns]
    head = ["model", "AIM", *arrows, "HV", "HV gain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    aim_col = {"population": "population", "merge": "no", "aim": "yes", "control": "control",
               "change": "% change"}
    for r in rows:
        pct = r.kind == "change"
        cells = [r.label, aim_col[r.kind]] + [_fmt(r.values[b], pct) for b in columns]
        cells += ["" if pct else _fmt(r.hv), _fmt(r.gain, pct)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MAX_LABELLED = 20  # above this many models, only the population and the Pareto front are named
LOG_SPAN = 10.0  # an axis whose positive values span this factor or more is drawn on a log scale


def plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (1.6, 2, 300) instead of 1.6x10^0."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
    axis.set_minor_formatter(plain)


def _log_scale_if_wide(ax, which: str, values: list[float]) -> None:
    """Put axis `which` ("x" or "y") on a log scale when its values are positive and span
    LOG_SPAN or more (broken merges reach 10-20x the population's perplexity)."""
    if values and min(values) > 0 and max(values) / min(values) >= LOG_SPAN:
        getattr(ax, f"set_{which}scale")("log")
        plain_log_ticks(getattr(ax, f"{which}axis"))


def plot_pareto(table: Table, x: str, y: str, path: str | Path, title: str | None = None) -> Path:
    """PNG scatter of two benchmarks: population, merges, AIM runs (arrows from their merge),
    controls and the Pareto front, with non-overlapping labels (every model up to MAX_LABELLED,
    else the population and the front)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    from evaluation.labels import place_labels

    unknown = [b for b in (x, y) if b not in table.higher]
    if unknown:
        raise ValueError(f"plot benchmarks {unknown} are not in the results "
                         f"({', '.join(table.columns)})")
    higher = table.higher
    styles = {"population": ("s", "tab:gray", "population"), "merge": ("o", "tab:blue", "merge"),
              "aim": ("^", "tab:orange", "merge + AIM"),
              "control": ("x", "tab:green", "merge + control (channel_blind / uniform)")}
    models = [r for r in table.rows if r.kind in styles and r.values.get(x) is not None
              and r.values.get(y) is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for kind, (marker, color, name) in styles.items():
        pts = [(r.values[x], r.values[y]) for r in models if r.kind == kind]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=name, zorder=3)
    by_label = {r.label: r for r in models}
    for r in models:
        if r.kind == "aim" and r.partner in by_label:  # arrow: merge without AIM -> with AIM
            start = by_label[r.partner]
            ax.annotate("", (r.values[x], r.values[y]), (start.values[x], start.values[y]),
                        arrowprops={"arrowstyle": "->", "color": "tab:orange", "alpha": 0.6})
    sx, sy = (1 if higher[x] else -1), (1 if higher[y] else -1)
    front = pareto_front([(sx * r.values[x], sy * r.values[y]) for r in models])
    if len(front) > 1:  # one point is a front of itself, drawn already
        ax.step([sx * p[0] for p in front], [sy * p[1] for p in front], where="pre",
                color="black", linestyle="--", linewidth=1, label="Pareto front", zorder=2)
    _log_scale_if_wide(ax, "x", [r.values[x] for r in models])
    _log_scale_if_wide(ax, "y", [r.values[y] for r in models])
    ax.set_xlabel(f"{x} ({'higher' if higher[x] else 'lower'} is better)")
    ax.set_ylabel(f"{y} ({'higher' if higher[y] else 'lower'} is better)")
    ax.set_title(title or f"{x} vs {y}: {len(models)} models", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    on_front = set(front)
    named = [r for r in models if len(models) <= MAX_LABELLED or r.kind == "population"
             or (sx * r.values[x], sy * r.values[y]) in on_front]
    place_labels(ax, [(r.values[x], r.values[y]) for r in named], [r.label for r in named])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def make_report(population_files: list[str], result_files: list[str], *,
                plot: tuple[str, str] | None = None, plot_path: str | Path | None = None,
                **table_options) -> tuple[str, Path | None]:
    """Load result files; return (markdown report, Pareto plot path or None).

    The plot shows the benchmarks `plot` (default: the first two HV benchmarks, else the first
    two columns) and goes to `plot_path` (default `pareto_<x>_<y>.png` beside the first result
    file). `table_options` go to `build_table`.
    """
    from evaluation.results import load_results

    table = build_table([load_results(f) for f in population_files],
                        [load_results(f) for f in result_files], **table_options)
    candidates = table.hv_benchmarks if len(table.hv_benchmarks) >= 2 else table.columns
    axes = plot or tuple(candidates[:2])
    if len(axes) != 2:
        return table.markdown(), None
    target = plot_path or Path(result_files[0]).parent / f"pareto_{axes[0]}_{axes[1]}.png"
    return table.markdown(), plot_pareto(table, axes[0], axes[1], target)
