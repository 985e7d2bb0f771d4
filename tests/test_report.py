"""Hypervolume, HV gain, the comparison table's % change arithmetic, and the Pareto plot."""
from __future__ import annotations

import itertools
import random

import pytest

import evaluate_model
from evaluation.pareto import Axis, hv_gain, hypervolume, normalise, pareto_front, population_axes
from evaluation.report import DEFAULT_HV_MARGIN, build_table, merge_key, partners, pct_change, variant_kind
from evaluation.results import FORMAT, save_results


def inclusion_exclusion_hv(points, ref):
    """Independent reference: |union of boxes| = sum over subsets of (-1)^(k+1) |intersection|."""
    total = 0.0
    for k in range(1, len(points) + 1):
        for subset in itertools.combinations(points, k):
            corner = [min(p[i] for p in subset) for i in range(len(ref))]
            vol = 1.0
            for c, r in zip(corner, ref):
                vol *= max(c - r, 0.0)
            total += (-1) ** (k + 1) * vol
    return total


@pytest.mark.parametrize("points, ref, expected", [
    ([(1, 3), (2, 2), (3, 1)], (0, 0), 6.0),             # staircase: 3 + 2 + 1
    ([(1, 3), (2, 2), (3, 1), (1, 1)], (0, 0), 6.0),     # a dominated point adds nothing
    ([(1, 3), (2, 2), (3, 1)], (0.5, 0.5), 3.25),        # 2.5*0.5 + 1.5*1 + 0.5*1
    ([(2, 2), (-1, 5)], (0, 0), 4.0),                    # below the reference on one axis: ignored
    ([], (0, 0), 0.0),
])
def test_hypervolume_2d(points, ref, expected):
    assert hypervolume(points, ref) == pytest.approx(expected)


@pytest.mark.parametrize("points, expected", [
    ([(1, 1, 1)], 1.0),
    ([(2, 1, 1), (1, 2, 1), (1, 1, 2)], 4.0),          # 3*2 - 3*1 + 1
    ([(3, 1, 1), (1, 3, 1), (1, 1, 3)], 7.0),          # 3*3 - 3*1 + 1
    ([(1, 2, 3), (3, 2, 1)], 10.0),                    # 6 + 6 - 2
    ([(1, 2, 3), (3, 2, 1), (1, 1, 1)], 10.0),
])
def test_hypervolume_3d(points, expected):
    assert hypervolume(points, (0, 0, 0)) == pytest.approx(expected)


@pytest.mark.parametrize("dim", [2, 3, 4, 6])
def test_hypervolume_matches_inclusion_exclusion(dim):
    rng = random.Random(dim)
    for _ in range(20):
        points = [tuple(rng.uniform(-0.2, 1.0) for _ in range(dim)) for _ in range(rng.randint(1, 6))]
        assert hypervolume(points, (0.0,) * dim) == pytest.approx(inclusion_exclusion_hv(points, (0.0,) * dim))


def test_hv_gain():
    population = [(1.0, 0.0), (0.0, 1.0)]  # each expert is best on one axis and worst on the other
    assert hv_gain((0.5, 0.5), population) == pytest.approx((0.25, 0.25))
    assert hv_gain((0.5, 0.0), population) == pytest.approx((0.0, 0.0))
    pop3 = [(1.0, 0.5, 0.5), (0.5, 1.0, 0.5)]  # HV(P) = 0.25 + 0.25 - 0.125 = 0.375
    # with m = (0.5, 0.5, 1): 3 * 0.25 - 3 * 0.125 + 0.125 = 0.5, so the gain is 0.125
    assert hv_gain((0.5, 0.5, 1.0), pop3) == pytest.approx((0.5, 0.125))


def test_normalisation_flips_lower_is_better_metrics():
    axes = population_axes([{"acc": 0.2, "ppl": 4.0}, {"acc": 0.6, "ppl": 2.0}], ["acc", "ppl"],
                           {"acc": True, "ppl": False})
    assert axes == [Axis("acc", 0.2, 0.6, True), Axis("ppl", 2.0, 4.0, False)]
    assert normalise({"acc": 0.4, "ppl": 3.0}, axes) == pytest.approx((0.5, 0.5))
    assert normalise({"acc": 0.6, "ppl": 2.0}, axes) == pytest.approx((1.0, 1.0))
    assert normalise({"acc": 0.8, "ppl": 5.0}, axes) == pytest.approx((1.5, -0.5))
    assert Axis("flat", 0.3, 0.3).normalise(0.5) == pytest.approx(0.2)  # zero span: shift only


def test_pareto_front():
    assert pareto_front([(1, 3), (2, 2), (1, 1), (3, 1), (2, 2)]) == [(1, 3), (2, 2), (3, 1)]


@pytest.mark.parametrize("old, new, expected", [
    (0.5, 0.6, 20.0), (0.5, 0.4, -20.0), (2.5, 2.25, -10.0), (-0.5, -0.25, 50.0),
    (0.0, 0.0, 0.0), (0.0, 0.1, None), (None, 0.1, None)])
def test_pct_change(old, new, expected):
    assert pct_change(old, new) == (pytest.approx(expected) if expected is not None else None)


HIGHER = {"toy_math": True, "toy_ppl": False}


def record(label: str, scores: dict[str, float], date: str = "2026-01-01T00:00:00",
           recipe: dict | None = None) -> dict:
    return {"format": FORMAT, "label": label, "date": date, "scores": scores, "recipe": recipe or {},
            "headline": {b: {"higher_is_better": HIGHER[b], "value": v} for b, v in scores.items()}}


def merged_by(method: str, save_path: str, mode: str | None = None) -> dict:
    """The recipe record a merged (mode None) or relaxed model folder carries."""
    merge = {"method": method, "base_model": "base", "models": ["expert_math"],
             "save_path": save_path, "params": {"weights": [1.0]}, "seed": 0, "device": "auto"}
    return {"merge": merge, **({"aim": {"mode": mode, "omega": 0.4}} if mode else {})}


POPULATION = [record("base", {"toy_math": 0.0, "toy_ppl": 2.0}),
              record("expert_math", {"toy_math": 0.8, "toy_ppl": 3.0})]
MERGED = [record("ties_math", {"toy_math": 0.4, "toy_ppl": 2.5},          # normalised (0.5, 0.5)
                 recipe=merged_by("ties", "out/ties")),
          record("ties_math_aim0.4", {"toy_math": 0.6, "toy_ppl": 2.25},  # normalised (0.75, 0.75)
                 recipe=merged_by("ties", "out/ties", "aim"))]


def test_merges_pair_with_their_aim_runs_by_record_not_label():
    """Labels say nothing: an inline AIM merge (its own save_path) and a post-hoc one both pair
    with the plain merge of the same recipe; another method's AIM run does not."""
    runs = [record("plain", {"toy_math": 0.4}, recipe=merged_by("ties", "a")),
            record("x_aim_0.4", {"toy_math": 0.4}, recipe=merged_by("dare_ties", "a", "aim")),
            record("inline", {"toy_math": 0.5}, recipe=merged_by("ties", "b", "aim")),
            record("control", {"toy_math": 0.5}, recipe=merged_by("ties", "c", "uniform")),
            record("foreign_aim0.4", {"toy_math": 0.5})]
    assert [variant_kind(r) for r in runs] == ["merge", "aim", "aim", "control", "merge"]
    assert merge_key(runs[0]) == merge_key(runs[2]) != merge_key(runs[1])
    assert merge_key(runs[4]) is None
    assert partners(runs) == {"inline": "plain", "control": "plain"}


def test_rows_hv_gain_and_percent_change():
    table = build_table(POPULATION, MERGED, hv_margin=0.0)
    rows = table.rows
    assert table.columns == table.hv_benchmarks == ["toy_math", "toy_ppl"] and table.higher == HIGHER
    assert [(r.kind, r.label) for r in rows] == [("population", "base"), ("population", "expert_math"),
                                                ("merge", "ties_math"), ("aim", "ties_math_aim0.4"),
                                                ("change", "")]
    assert [r.gain for r in rows[:2]] == [0.0, 0.0]  # HV(P) = 0: each has a 0 coordinate
    assert (rows[2].hv, rows[2].gain) == pytest.approx((0.25, 0.25))
    assert (rows[3].hv, rows[3].gain) == pytest.approx((0.5625, 0.5625))
    assert rows[3].partner == "ties_math"
    change = rows[4]
    assert change.values == pytest.approx({"toy_math": 50.0, "toy_ppl": -10.0})
    assert change.gain == pytest.approx(125.0)
    text = table.markdown()
    assert "| toy_math ↑ | toy_ppl ↓ | HV | HV gain |" in text
    assert "| ties_math_aim0.4 | yes | 0.6000 | 2.2500 | 0.5625 | 0.5625 |" in text
    assert "|  | % change | +50.0% | -10.0% |  | +125.0% |" in text


def test_controls_follow_their_merge_as_controls_without_a_change_row():
    controls = [record("ties_math_uniform0.4", {"toy_math": 0.5, "toy_ppl": 2.4},
                       recipe=merged_by("ties", "out/u", "uniform")),
                record("ties_math_blind0.4", {"toy_math": 0.3, "toy_ppl": 2.2},
                       recipe=merged_by("ties", "out/b", "channel_blind"))]
    table = build_table(POPULATION, [*controls, *MERGED])
    assert [(r.kind, r.label, r.partner) for r in table.rows[2:]] == [
        ("merge", "ties_math", None), ("aim", "ties_math_aim0.4", "ties_math"), ("change", "", None),
        ("control", "ties_math_uniform0.4", "ties_math"), ("control", "ties_math_blind0.4", "ties_math")]
    assert "| ties_math_blind0.4 | control | 0.3000 | 2.2000 |" in table.markdown()


def test_hv_margin_moves_the_reference_point():
    worse_ppl = [record("ties_math", {"toy_math": 0.9, "toy_ppl": 3.5})]  # normalised (1.125, -0.5)
    assert build_table(POPULATION, worse_ppl, hv_margin=0.0).rows[-1].gain == 0.0
    # reference (-1, -1): only the strip x in [1, 1.125], y in [-1, -0.5] is new
    table = build_table(POPULATION, worse_ppl, hv_margin=1.0)
    assert table.rows[-1].gain == pytest.approx(0.125 * 0.5)
    assert table.rows[0].hv == pytest.approx(3.0)  # 2 + 2 - 1
    assert "reference point -1 on every axis" in table.markdown()


def test_default_hv_margin_is_the_studys():
    assert DEFAULT_HV_MARGIN == 0.1
    assert evaluate_model.build_parser().parse_args(["--report", "r.json"]).hv_margin == DEFAULT_HV_MARGIN
    # reference (-0.1, -0.1): HV(P) = 0.11 + 0.11 - 0.01; ties_math (0.5, 0.5) adds 0.36 - 0.11
    merge = build_table(POPULATION, MERGED).rows[2]
    assert (merge.hv, merge.gain) == pytest.approx((0.46, 0.25))


def test_report_command_writes_table_and_png(tmp_path, capsys):
    pop = [save_results(r, tmp_path / "pop") for r in POPULATION]
    # an older duplicate of ties_math must lose to the newer run
    merged = [save_results(r, tmp_path / "runs") for r in
              [record("ties_math", {"toy_math": 0.1, "toy_ppl": 9.0}, "2025-01-01T00:00:00"), *MERGED]]
    png, md = tmp_path / "plots" / "front.png", tmp_path / "report.md"
    rc = evaluate_model.main(["--report", *map(str, merged), "--population", ",".join(map(str, pop)),
                              "--plot", "toy_math,toy_ppl", "--plot_path", str(png), "--report_md", str(md),
                              "--hv_margin", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| ties_math | no | 0.4000 | 2.5000 | 0.2500 | 0.2500 |" in out and md.read_text() in out + "\n"
    import matplotlib
    assert matplotlib.get_backend().lower() == "agg"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 5000


def test_report_errors_are_one_line(tmp_path, capsys):
    merged = save_results(MERGED[0], tmp_path)
    assert evaluate_model.main(["--report", str(merged)]) == 2
    assert evaluate_model.main(["--report", str(merged), "--population", str(merged),
                                "--plot", "toy_math,nope"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert "--population" in err[0] and "nope" in err[1]


def test_an_axis_spanning_ten_times_or_more_goes_log_scale():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.report import _log_scale_if_wide

    fig, ax = plt.subplots()
    _log_scale_if_wide(ax, "y", [125.3, 134.2, 1864.7])  # a broken merge's perplexity
    _log_scale_if_wide(ax, "x", [0.06, 0.5])  # skill means: 8.3x, stays linear
    assert (ax.get_yscale(), ax.get_xscale()) == ("log", "linear")
    _log_scale_if_wide(ax, "x", [0.0, 0.6])  # a zero cannot go on a log axis
    assert ax.get_xscale() == "linear"
    plt.close(fig)
