"""The study's figures: the omega sweep (per variant) and the Pareto front of one zoo."""
from __future__ import annotations

from pathlib import Path
from statistics import geometric_mean, mean

from evaluation.report import Table, plain_log_ticks, plot_pareto
from study.grid import MODES
from study.families import Family
from study.tables import SKILL_MEAN

COLORS = {"aim": "tab:orange", "channel_blind": "tab:blue", "uniform": "tab:green"}


def pareto_plot(table: Table, family: Family, title: str, path: Path) -> Path:
    """Mean skill score against perplexity for the population, the merges and their AIM runs."""
    return plot_pareto(table, SKILL_MEAN, family.ppl, path, title=title)


def omega_sweep_plot(points: dict[str, dict[str, dict[float, tuple[float, float]]]], family: Family,
                     title: str, path: Path) -> Path:
    """Skill mean and perplexity vs omega: one thick line per variant (over the swept merges: the
    mean skill, the geometric mean perplexity) and, with several merges, one thin line per merge;
    perplexity on a log axis (broken merges reach hundreds). `points` is `tables.sweep_points`;
    omega 1 = no AIM."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        curves = [modes[mode] for modes in points.values() if mode in modes]
        if not curves:
            continue
        omegas = sorted(set.intersection(*(set(c) for c in curves)))
        for i, ax in enumerate(axes):
            for curve in curves if len(curves) > 1 else ():
                ax.plot(sorted(curve), [curve[w][i] for w in sorted(curve)], color=COLORS[mode],
                        alpha=0.25, linewidth=0.8)
            average = mean if i == 0 else geometric_mean
            over = f"mean of {len(curves)} merges" if len(curves) > 1 else "1 merge"
            ax.plot(omegas, [average(c[w][i] for c in curves) for w in omegas], color=COLORS[mode],
                    marker="o", linewidth=2, label=f"{mode} ({over})")
    for ax, name in zip(axes, (f"{SKILL_MEAN} (higher is better)",
                               f"{family.ppl} {family.ppl_metric} (lower is better)")):
        ax.set_xlabel("omega (1 = merge without AIM)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    plain_log_ticks(axes[1].yaxis)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
