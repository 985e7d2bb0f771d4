"""`python -m study.emergence`: snapshots, ratios and the reports of the outlier-emergence sweep."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aim.collect import collect_stats
from aim.stats_io import load_stats
from study import emergence as cli
from study.emergence import (BaseConfig, markdown, parse_config, ratio_summary, snapshot_steps,
                             verdict)
from toy_zoo.train import ZooRecipe, build_model, train_base

TINY = "tiny:hidden_size=32,intermediate_size=64,num_heads=2,num_layers=1,base_steps=6,base_batch=2"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One tiny config measured at its start, middle and end through the command line."""
    out = tmp_path_factory.mktemp("emergence")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    code = cli.main(["--out", str(out), "--configs", TINY, "--snapshots", "0,0.5,1",
                     "--calib-samples", "8"])
    torch.set_num_threads(threads)
    assert code == 0
    return out, json.loads((out / "emergence.json").read_text())["configs"][0]


def _lower_median(values: np.ndarray) -> float:
    """torch.median's median: the lower of the two middle values for an even count."""
    return float(np.sort(values)[(values.size - 1) // 2])


def test_reported_ratios_are_max_over_median_of_the_saved_stats(sweep):
    out, record = sweep
    assert [s["step"] for s in record["snapshots"]] == [0, 3, 6]
    for snap in record["snapshots"]:
        stats, _ = load_stats(out / "tiny" / f"stats_step{snap['step']}.safetensors")
        expected = {}
        for name, s in stats.stats.items():
            v = s.double().abs().numpy()
            expected[name] = v.max() / _lower_median(v)
            assert snap["top_channel"][name] == int(v.argmax())
        assert snap["ratios"].keys() == expected.keys()
        for name, value in expected.items():
            assert snap["ratios"][name] == pytest.approx(value, rel=1e-6)
        assert snap["summary"]["max"] == pytest.approx(max(expected.values()), rel=1e-6)
        assert snap["summary"]["median"] == pytest.approx(float(np.median(list(expected.values()))), rel=1e-6)
    assert "## Per module, final weights" in (out / "emergence.md").read_text()


def _stats_of(model, blocks) -> dict[str, torch.Tensor]:
    return collect_stats(model.eval(), blocks, batch_size=4, progress=False).stats


def test_snapshots_measure_the_initial_and_the_unperturbed_trained_weights(sweep):
    from study.emergence import calibration

    out, record = sweep
    recipe = parse_config(TINY).recipe()
    blocks = calibration(out, 8, recipe.block_len).blocks
    torch.manual_seed(recipe.seed)
    initial = _stats_of(build_model(recipe), blocks)
    trained = _stats_of(train_base(recipe), blocks)  # no hooks installed here
    for step, reference in ((0, initial), (6, trained)):
        saved, _ = load_stats(out / "tiny" / f"stats_step{step}.safetensors")
        for name, s in reference.items():
            torch.testing.assert_close(saved.stats[name], s, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(initial["lm_head.weight"], trained["lm_head.weight"])


def test_a_rerun_reuses_a_matching_record_and_retrains_a_changed_recipe(sweep, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sweep[0], out)
    saved = out / "tiny" / "result.json"
    saved.write_text(saved.read_text().replace('"params": ', '"params": 7'))  # marks the stored record
    args = ["--out", str(out), "--snapshots", "0,0.5,1", "--calib-samples", "8", "--configs"]
    assert cli.main([*args, TINY]) == 0
    reused = json.loads((out / "emergence.json").read_text())["configs"][0]
    assert str(reused["params"]) == "7" + str(sweep[1]["params"])
    assert cli.main([*args, TINY.replace("base_steps=6", "base_steps=2")]) == 0
    retrained = json.loads((out / "emergence.json").read_text())["configs"][0]
    assert [s["step"] for s in retrained["snapshots"]] == [0, 1, 2] and retrained["params"] == sweep[1]["params"]
    assert sorted(p.name for p in (out / "tiny").glob("stats_*")) == [f"stats_step{k}.safetensors" for k in (0, 1, 2)]


def test_snapshot_steps_and_summary_by_hand():
    assert snapshot_steps(450, (0.0, 0.125, 0.25, 0.5, 1.0)) == [0, 56, 112, 225, 450]
    assert snapshot_steps(4, (0.1, 0.2)) == [0, 1, 4]
    s = ratio_summary({"a": 1.0, "b": 30.0, "c": 2.0, "d": 21.0})
    assert (s["max"], s["max_module"], s["median"], s["modules_at_outlier_ratio"]) == (30.0, "b", 11.5, ["b", "d"])


def _record(name: str, ratios: dict[str, float]) -> dict:
    snap = {"step": 10, "fraction": 1.0, "loss": 0.5, "ratios": ratios, "summary": ratio_summary(ratios),
            "top_channel": {m: 0 for m in ratios}}
    return {"name": name, "recipe": ZooRecipe().as_dict(), "steps": 10, "params": 1000,
            "seconds": {"train": 1.0}, "snapshots": [snap]}


def test_verdict_names_outlier_modules_or_the_closest_one():
    flat = _record("flat", {"model.layers.0.mlp.down_proj.weight": 7.5, "lm_head.weight": 1.3})
    spiky = _record("spiky", {"model.layers.1.self_attn.q_proj.weight": 24.0, "lm_head.weight": 2.0})
    assert verdict([flat]) == ("No configuration grew outlier channels (max/median >= 20) in any module; "
                               "the largest at the end of training was 7.5 (flat, layers.0.mlp.down_proj).")
    assert verdict([flat, spiky]) == "Outlier channels (max/median >= 20) appeared in: spiky (layers.1.self_attn.q_proj)."
    text = markdown([flat, spiky], "# head")
    assert "| spiky | 128x2, 10 steps, lr 0.003 | 1,000 | 0.500 | 24.0 | layers.1.self_attn.q_proj (0) | 13.00 | 1 |" in text


@pytest.mark.parametrize("argv", [
    ["--configs", "x:hidden_sise=64"], ["--configs", "x:hidden_size=abc"], ["--configs", "nope"],
    ["--configs", "x:hidden_size=48,num_heads=5"], ["--snapshots", "0,1.5"], ["--configs", "zoo", "zoo"],
])
def test_bad_flags_exit_2_before_training(argv, tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path), *argv]) == 2
    assert capsys.readouterr().err.startswith("error: --")
    assert not (tmp_path / "emergence.json").exists()


def test_presets_are_valid_recipes():
    from study.emergence import PRESETS

    for name, overrides in PRESETS.items():
        recipe = BaseConfig(name, overrides).recipe()
        assert recipe.hidden_size % recipe.num_heads == 0 and recipe.hidden_size // recipe.num_heads == 32
