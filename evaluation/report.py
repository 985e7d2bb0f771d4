"""The paper-style comparison from result files: merges with and without AIM, % change, HV gain.

Rows: the population (the models the merges were made from), then per merge its run without
AIM, each AIM variant and a "% change" row (AIM vs without). A run is an AIM variant when its
label contains the token matched by `AIM_PATTERN` (`TIES_AIM_InstructMathCode`,
`ties_math_code_aim0.4`); removing that token gives the label of its partner without AIM.
HV and HV gain are defined in `evaluation.pareto`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from evaluation.pareto import hv_gain, normalise, pareto_front, population_axes

log = logging.getLogger(__name__)

AIM_PATTERN = r"(?i)(?:^|[_-])aim(?:[_-]?(?:w|omega)?[0-9]*\.?[0-9]+)?(?=$|[_-])"


@dataclass
class Row:
    """One table row: a model's scores, or the % change of an AIM variant vs its partner."""

    kind: str                        # population | merge | aim | change
    label: str
    values: dict[str, float | None]  # benchmark -> score (or % change)
    hv: float | None = None
    gain: float | None = None
    partner: str | None = None       # for AIM rows: the label of the same merge without AIM


def pct_change(old: float | None, new: float | None) -> float | None:
    """100 * (new - old) / |old|; 0 when both are 0, None when old is 0 (or either is missing)."""
    if old is None or new is None:
        return None
    if old == 0:
        return 0.0 if new == 0 else None
    return 100.0 * (new - old) / abs(old)


def split_aim(label: str, pattern: str = AIM_PATTERN) -> tuple[str, bool]:
    """(partner label without the AIM token, whether the label had one)."""
    stripped, n = re.subn(pattern, "", label)
    return stripped.strip("_-") if n else label, bool(n)


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
    hv_margin: float = 0.0

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


def build_table(population: list[dict], merged: list[dict], *, aim_pattern: str = AIM_PATTERN,
                hv_benchmarks: list[str] | None = None, hv_margin: float = 0.0) -> Table:
    """Rows for result records (from `evaluate` or result files): population, merges, AIM, % change.

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
    plain = {r["label"] for r in merged if not split_aim(r["label"], aim_pattern)[1]}
    for rec in merged:
        key, is_aim = split_aim(rec["label"], aim_pattern)
        if is_aim and key in plain:
            continue  # listed right after its partner below
        rows.append(row("aim" if is_aim else "merge", rec))
        base = rows[-1]
        for other in merged:
            if is_aim or split_aim(other["label"], aim_pattern) != (rec["label"], True):
                continue
            aim = row("aim", other)
            aim.partner = base.label
            change = {b: pct_change(base.values[b], aim.values[b]) for b in columns}
            rows += [aim, Row("change", "", change, gain=pct_change(base.gain, aim.gain))]
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
    aim_col = {"population": "population", "merge": "no", "aim": "yes", "change": "% change"}
    for r in rows:
        pct = r.kind == "change"
        cells = [r.label, aim_col[r.kind]] + [_fmt(r.values[b], pct) for b in columns]
        cells += ["" if pct else _fmt(r.hv), _fmt(r.gain, pct)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_pareto(table: Table, x: str, y: str, path: str | Path) -> Path:
    """PNG scatter of two benchmarks: population, merges, AIM variants (arrows), Pareto front."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    unknown = [b for b in (x, y) if b not in table.higher]
    if unknown:
        raise ValueError(f"plot benchmarks {unknown} are not in the results "
                         f"({', '.join(table.columns)})")
    higher = table.higher
    styles = {"population": ("s", "tab:gray"), "merge": ("o", "tab:blue"),
              "aim": ("^", "tab:orange")}
    models = [r for r in table.rows if r.kind in styles and r.values.get(x) is not None
              and r.values.get(y) is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    for kind, (marker, color) in styles.items():
        pts = [(r.values[x], r.values[y]) for r in models if r.kind == kind]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=kind, zorder=3)
    for r in models:
        ax.annotate(r.label, (r.values[x], r.values[y]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    by_label = {r.label: r for r in models}
    for r in models:
        if r.partner in by_label:  # arrow: merge without AIM -> with AIM
            start = by_label[r.partner]
            ax.annotate("", (r.values[x], r.values[y]), (start.values[x], start.values[y]),
                        arrowprops={"arrowstyle": "->", "color": "tab:orange", "alpha": 0.6})
    sx, sy = (1 if higher[x] else -1), (1 if higher[y] else -1)
    front = pareto_front([(sx * r.values[x], sy * r.values[y]) for r in models])
    if front:
        ax.step([sx * p[0] for p in front], [sy * p[1] for p in front], where="pre",
                color="black", linestyle="--", linewidth=1, label="Pareto front")
    ax.set_xlabel(f"{x} ({'higher' if higher[x] else 'lower'} is better)")
    ax.set_ylabel(f"{y} ({'higher' if higher[y] else 'lower'} is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
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
