"""The study command (`python -m study`): grid, tables, statistics and the quick run on a small zoo."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from study.grid import (METHODS, MODES, MergeJob, Variant, combinations, merge_jobs, study_plan,
                        weight_matters)
from study.__main__ import where_written
from study.families import POPULATION, TOY
from study.run import ZooResults

BENCHMARKS = TOY.benchmarks
from study.tables import (ablation_markdown, control_summary_markdown, main_table, stat_ratios,
                          top_channels)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_weight_regimes_only_for_methods_that_scale_with_the_weight():
    assert weight_matters("task_arithmetic") and weight_matters("dare_linear")
    assert weight_matters("dare_ties")
    assert not weight_matters("ties")    # disjoint mean: a uniform weight cancels out
    assert not weight_matters("widen")   # takes no weights


def test_grid_has_every_method_combination_and_regime():
    combos = combinations()
    assert combos == [("instruct", "math"), ("instruct", "code"), ("math", "code"),
                      ("instruct", "math", "code")]
    jobs = merge_jobs(METHODS, combos, (1.0, 0.7), 0.5)
    # 3 weight-scaled methods x 2 regimes x 4 combinations + ties and widen x 4
    assert len(jobs) == 3 * 2 * 4 + 2 * 4
    labels = [j.label for j in jobs]
    assert len(set(labels)) == len(labels)
    assert "task_arithmetic_w1_InstructMathCode" in labels
    assert "dare_ties_w0.7_MathCode" in labels and "ties_InstructCode" in labels
    widen = [j for j in jobs if j.method == "widen"]
    assert all(j.density is None and j.weight is None for j in widen)
    assert all(j.density == 0.5 for j in jobs if j.method in ("ties", "dare_linear", "dare_ties"))


def test_job_builds_the_intended_recipe(tmp_path):
    job = MergeJob("dare_ties", ("instruct", "math", "code"), 0.7, 0.5)
    recipe = job.recipe("Z", str(tmp_path / "out"))
    assert recipe.method == "dare_ties" and recipe.base_model == "Z/base"
    assert recipe.models == ("Z/expert_instruct", "Z/expert_math", "Z/expert_code")
    assert recipe.params["weights"] == [0.7, 0.7, 0.7]
    assert recipe.params["density"] == [0.5, 0.5, 0.5]


def test_dare_merges_run_once_per_seed_and_carry_it_to_the_recipe(tmp_path):
    jobs = merge_jobs(("ties", "dare_linear"), [("math", "code")], (1.0,), 0.5, seeds=(0, 3))
    assert [(j.method, j.seed, j.label) for j in jobs] == [
        ("ties", 0, "ties_MathCode"), ("dare_linear", 0, "dare_linear_w1_MathCode"),
        ("dare_linear", 3, "dare_linear_w1_MathCode_s3")]
    assert jobs[2].recipe("Z", str(tmp_path / "o")).seed == 3


def test_dare_seed_sizes_give_every_seed_only_to_merges_of_those_sizes():
    combos = [("math", "code"), ("instruct", "math", "code")]
    jobs = merge_jobs(("dare_ties",), combos, (0.3,), 0.5, seeds=(0, 1), seed_sizes=(3,))
    assert [j.label for j in jobs] == ["dare_ties_w0.3_MathCode", "dare_ties_w0.3_InstructMathCode",
                                       "dare_ties_w0.3_InstructMathCode_s1"]


def test_standard_error_of_a_pass_rate():
    from study.tables import standard_error

    assert standard_error(0.5, 100) == 0.05
    assert standard_error(0.0, 200) == 0.0 and standard_error(1.0, 7) == 0.0
    assert abs(standard_error(0.9, 400) - 0.015) < 1e-12


def test_plan_sweeps_only_three_expert_merges_and_outlier_plan_keeps_only_those():
    kwargs = dict(methods=("task_arithmetic", "ties"), weights=(1.0,), density=0.5, omega=0.4,
                  sweep=(0.2, 0.6), sweep_sizes=(3,), combos=combinations())
    plan = study_plan(**kwargs)
    assert len(plan) == 8
    for job, variants in plan:
        if len(job.experts) == 3:
            assert sorted((v.mode, v.omega) for v in variants) == sorted(
                (m, w) for m in MODES for w in (0.2, 0.4, 0.6))
        else:
            assert variants == [Variant("aim", 0.4)]
    swept = study_plan(**kwargs, only_swept=True)
    assert [job.label for job, _ in swept] == ["task_arithmetic_w1_InstructMathCode",
                                               "ties_InstructMathCode"]


def fake_record(label: str, skills: tuple[float, float, float], ppl: float,
                recipe: dict | None = None) -> dict:
    scores = dict(zip(BENCHMARKS, (*skills, ppl)))
    return {"label": label, "date": "2026-01-01T00:00:00", "scores": scores, "recipe": recipe or {},
            "headline": {b: {"higher_is_better": b != "toy_ppl"} for b in BENCHMARKS}}


def synthetic_results() -> ZooResults:
    """Two swept merges: AIM beats channel_blind on A and loses on B (by hand-set scores)."""
    res = ZooResults("zoo")
    res.population = [fake_record("base", (0, 0, 0), 1.5), fake_record("expert_instruct", (1, 0, 0), 1.6),
                      fake_record("expert_math", (0, 1, 0), 1.6), fake_record("expert_code", (0, 0, 1), 1.6)]
    points = {"A": {None: ((0.4, 0.4, 0.4), 3.0), "aim": ((0.3, 0.3, 0.3), 1.6),
                    "channel_blind": ((0.2, 0.2, 0.2), 1.7), "uniform": ((0.2, 0.2, 0.2), 1.6)},
              "B": {None: ((0.3, 0.3, 0.3), 2.0), "aim": ((0.1, 0.1, 0.1), 2.0),
                    "channel_blind": ((0.2, 0.2, 0.2), 1.9), "uniform": ((0.1, 0.1, 0.1), 2.0)}}
    for merge, by_mode in points.items():
        res.jobs[merge] = MergeJob("task_arithmetic", ("instruct", "math", "code"), 1.0)
        recipe = {"merge": {"method": "task_arithmetic", "models": [merge]}}
        res.records[merge] = fake_record(merge, *by_mode[None], recipe)
        res.variants[merge] = []
        for mode in MODES:
            label = Variant(mode, 0.4).label(merge)
            res.records[label] = fake_record(label, *by_mode[mode],
                                             {**recipe, "aim": {"mode": mode, "omega": 0.4}})
            res.variants[merge].append((Variant(mode, 0.4), label))
    return res


def test_control_summary_differences_and_wins():
    text = control_summary_markdown(synthetic_results())
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
            for line in text.splitlines()[2:]}

    def cells(control):
        return [float(c) for c in rows[("0.4", control)].strip("|").split("|")[2:]]

    # A: +0.1 skill, ppl 1.6 vs 1.7 (AIM better on both); B: -0.1, 2.0 vs 1.9 (control better)
    ratio = math.sqrt(1.6 / 1.7 * 2.0 / 1.9)
    assert cells("channel_blind") == pytest.approx([2, 0.0, ratio, 1, 1], abs=1e-4)
    # A: +0.1 skill at equal ppl, B: equal: no strict win either way
    assert cells("uniform") == pytest.approx([2, 0.05, 1.0, 0, 0], abs=1e-4)


def test_ablation_rows_for_every_variant_with_the_merge_as_omega_one():
    lines = ablation_markdown(synthetic_results()).splitlines()
    assert lines[0].startswith("| merge | variant | ω=1 (no AIM) | ω=0.4 |")
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[1] for row in body] == list(MODES) * 2
    assert body[0] == ["A", "aim", "0.400 / 3.000", "0.300 / 1.600"]
    assert body[4] == ["", "channel_blind", "0.300 / 2.000", "0.200 / 1.900"]


def test_main_table_pairs_each_merge_with_its_aim_run_only():
    table = main_table(synthetic_results(), 0.4, hv_margin=0.1)
    kinds = [(r.kind, r.label) for r in table.rows]
    assert kinds[4:] == [("merge", "A"), ("aim", "A_aim0.4"), ("change", ""),
                         ("merge", "B"), ("aim", "B_aim0.4"), ("change", "")]
    change = table.rows[6].values
    assert change["toy_ppl"] == pytest.approx(100 * (1.6 - 3.0) / 3.0)
    assert change["skill_mean"] == pytest.approx(100 * (0.3 - 0.4) / 0.4)
    assert "skill_mean" in table.columns and table.hv_benchmarks == list(BENCHMARKS[:3])


def test_stat_ratios_and_top_channels_from_a_stats_file(tmp_path):
    from aim.stats_io import ActivationStats, StatsKey, save_stats

    stats = ActivationStats({"q.weight": torch.tensor([1.0, 2.0, 3.0, 4.0, 20.0]),
                             "o.weight": torch.tensor([2.0, 2.0, 2.0])},
                            axes={"q.weight": 1, "o.weight": 1})
    key = StatsKey("f", "data", 1, 8, 0, "float32")
    path = tmp_path / "stats.safetensors"
    save_stats(path, stats, key, base_model="b", blocks=torch.zeros(1, 8, dtype=torch.long),
               toolkit_version="t")
    assert stat_ratios(path) == pytest.approx({"q.weight": 20 / 3, "o.weight": 1.0})
    assert top_channels(path, 2)["q.weight"] == [3, 4]


def test_fast_lm_eval_renders_like_lm_eval_and_restores_it():
    import lm_eval.utils as lm_utils

    from study.run import fast_lm_eval

    original = lm_utils.apply_template
    doc = {"prompt": "12+30=", "answer": "42"}
    want = original("{{prompt}} -> {{answer}}", doc)
    with fast_lm_eval():
        assert lm_utils.apply_template is not original
        assert lm_utils.apply_template("{{prompt}} -> {{answer}}", doc) == want == "12+30= -> 42"
    assert lm_utils.apply_template is original


# ---- the quick study end to end on a CI-size zoo ---------------------------------------------

@pytest.fixture(scope="module")
def quick_study(ci_zoo, tmp_path_factory):
    """`python -m study --quick` on the session's CI-size zoo."""
    from study.__main__ import main

    out = tmp_path_factory.mktemp("study") / "out"
    code = main(["--quick", "--zoo", str(ci_zoo), "--out", str(out), "--keep-models"])
    return code, ci_zoo, out


def test_quick_study_runs_and_experts_beat_the_base(quick_study):
    code, _, out = quick_study
    assert code == 0
    summary = json.loads((out / "study.json").read_text())
    assert summary["status"] == "done"
    scores = summary["zoos"]["zoo"]["scores"]
    for skill in ("instruct", "math", "code"):  # the builder's CI-size guarantee
        base, expert = scores["base"][f"toy_{skill}"], scores[f"expert_{skill}"][f"toy_{skill}"]
        assert base <= 0.1 and expert >= base + 0.3, (skill, base, expert)


def test_quick_study_writes_every_result_and_loadable_model(quick_study):
    from transformers import AutoModelForCausalLM

    from evaluation.results import load_results
    from checkpoints.record import read_record
    from aim.stats_io import file_sha256

    _, _, out = quick_study
    merge = "task_arithmetic_w1_InstructMathCode"
    variants = [Variant(m, w).label(merge) for m in MODES for w in (0.2, 0.4)]
    labels = {load_results(p)["label"] for p in (out / "zoo" / "results").glob("*.json")}
    assert labels == {*POPULATION, merge, *variants}
    folders = sorted(p for p in (out / "zoo" / "models").iterdir() if p.is_dir())
    assert len(folders) == 1 + len(variants)
    stats_sha = file_sha256(out / "zoo" / "stats.safetensors")
    ids = torch.tensor([[5, 6, 7, 8]])
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert torch.isfinite(model(ids).logits).all(), folder
        record = read_record(folder)
        assert record["merge"]["method"] == "task_arithmetic"
        if folder.name != merge:  # every AIM run reused the one calibration
            assert record["aim"]["stats_sha256"] == stats_sha
            assert folder.name.startswith(f"{merge}_{record['aim']['mode']}")


def test_quick_study_tables_and_plots_parse(quick_study):
    import matplotlib.pyplot as plt

    _, _, out = quick_study
    table = (out / "zoo" / "table.md").read_text().splitlines()
    assert table[0].split("|")[1:-1] == [" model ", " AIM ", " toy_instruct ↑ ", " toy_math ↑ ",
                                          " toy_code ↑ ", " toy_ppl ↓ ", " skill_mean ↑ ", " HV ",
                                          " HV gain "]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table[2:] if line.startswith("|")]
    assert [r[:2] for r in rows[4:]] == [["task_arithmetic_w1_InstructMathCode", "no"],
                                         ["task_arithmetic_w1_InstructMathCode_aim0.4", "yes"],
                                         ["", "% change"]]
    assert all(re.fullmatch(r"[+-]\d+\.\d%|n/a|", c) for c in rows[6][2:])
    ablation = (out / "zoo" / "ablation.md").read_text().splitlines()
    assert [line.split("|")[2].strip() for line in ablation[2:]] == list(MODES)
    study_md = (out / "study.md").read_text()
    assert "AIM minus control" in study_md and "max / median" in study_md
    for name in ("pareto.png", "omega_sweep.png"):
        path = out / "zoo" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert plt.imread(path).ndim == 3
    named = re.findall(r"(/\S+\.(?:md|png))", where_written(out, ["zoo"]))  # the closing lines
    assert len(named) == 3 and all(Path(p).is_file() for p in named)


def test_study_refuses_to_mix_with_an_earlier_study(quick_study, capsys):
    from study.__main__ import main

    _, zoo, out = quick_study
    assert main(["--quick", "--zoo", str(zoo), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_zoo_family_sets_the_defaults_of_unset_flags_and_smollm2s_is_the_committed_grid():
    from study.__main__ import DEFAULTS, _apply_family_defaults, _plans, build_parser

    def parsed(*argv):
        args = build_parser().parse_args(list(argv))
        _apply_family_defaults(args)
        return args

    toy = parsed()
    assert {k: getattr(toy, k) for k in DEFAULTS} == DEFAULTS
    smol = parsed("--zoo", "smollm2")
    assert (smol.weights, smol.limit, smol.batch_size, smol.threads) == ((0.3,), 64, 64, 2)
    assert parsed("--zoo", "smollm2", "--limit", "200", "--weights", "0.5").limit == 200
    plan = _plans(smol)["smollm2"][2]
    # 5 methods x 4 combinations, DARE's second seed on the 3-expert merges; AIM 0.4 on each,
    # the sweep and both controls (3 modes x 3 omegas) on the 3-expert TA and TIES merges
    assert len(plan) == 22 and 4 + sum(1 + len(variants) for _, variants in plan) == 64
