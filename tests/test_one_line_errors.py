"""Issue 11: former tracebacks, late failures and silent acceptances, each now exit 2 (or a
warning) with one line naming the file or flag; every input file is unchanged afterwards."""
from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate_model
import merge
import performAIM
from evaluation import runner
from checkpoints import checkpoint
from tests.test_merge_cli import assert_user_error
from tests.test_output_safety import merge_args, models, tree_hashes  # noqa: F401 (fixture)
from tests.tiny_models import build_finetune, build_llama

AIM = ["--calib_samples", "4", "--block_size", "128"]


def aim_args(m: dict, save_path, *extra: str) -> list[str]:
    return ["--merged_model", str(m["merged"]), "--pretrained_model_name", str(m["base"]),
            "--save_path", str(save_path), *AIM, *extra]


def no_calibration(monkeypatch):
    import aim.pipeline

    def fail(*_a, **_k):
        raise AssertionError("calibrated before the bad flag was reported")

    monkeypatch.setattr(aim.pipeline, "_calibrate", fail)


# --- late failures -------------------------------------------------------------------------


def test_stats_on_an_unwritable_path_fails_before_calibration(models, tmp_path, monkeypatch,
                                                              capsys):
    no_calibration(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    before = tree_hashes(models["root"])
    code = performAIM.main(aim_args(models, tmp_path / "o", "--calib_data", "builtin",
                                    "--stats", str(blocker / "stats.safetensors")))
    assert_user_error(capsys, code, "--stats", str(blocker))
    assert tree_hashes(models["root"]) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", ["merge", "performAIM"])
def test_disk_full_while_copying_side_files(models, tmp_path, monkeypatch, script, capsys):
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.shutil, "copyfile", full)   # the side-file step only
    before = tree_hashes(models["root"])
    out = tmp_path / "o"
    if script == "merge":
        code = merge.main(merge_args(models, out))
    else:
        code = performAIM.main(aim_args(models, out, "--calib_data", "builtin"))
    assert_user_error(capsys, code, "disk full while writing", "--save_path")
    assert not list(tmp_path.iterdir())           # no output, no hidden staging folder
    assert tree_hashes(models["root"]) == before


# --- calibration files ---------------------------------------------------------------------


def _parquet_garbage(path: Path) -> None:
    path.write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")


@pytest.mark.parametrize("name, content, fragment", [
    ("bin.txt", bytes(range(256)) * 8, "not UTF-8 text"),
    ("bin.jsonl", b'{"text": "ok"}\n' + bytes(range(128, 256)), "not UTF-8 text"),
    ("bad.parquet", None, "not a readable parquet file"),
    ("empty.txt", b"", "the file is empty"),
    ("blank.jsonl", b"\n\n", "holds no documents"),
])
@pytest.mark.parametrize("script", ["performAIM", "merge --aim"])
def test_bad_calibration_files(models, tmp_path, script, name, content, fragment, capsys):
    calib = tmp_path / name
    _parquet_garbage(calib) if content is None else calib.write_bytes(content)
    before = tree_hashes(models["root"], calib)
    if script == "performAIM":
        code = performAIM.main(aim_args(models, tmp_path / "o", "--calib_data", str(calib)))
    else:
        code = merge.main(merge_args(models, tmp_path / "o", "--aim", "--calib_data", str(calib),
                                     *AIM))
    assert_user_error(capsys, code, f"--calib_data {calib}", fragment)
    assert tree_hashes(models["root"], calib) == before and not (tmp_path / "o").exists()


# --- evaluate_model.py ---------------------------------------------------------------------


def test_evaluate_checks_save_path_before_evaluating(models, tmp_path, monkeypatch, capsys):
    def fail(*_a, **_k):
        raise AssertionError("evaluated before --save_path was checked")

    monkeypatch.setattr(runner, "evaluate", fail)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = evaluate_model.main(["--model", str(models["base"]), "--benchmarks", "mmlu",
                                "--save_path", str(blocker / "results")])
    assert_user_error(capsys, code, "--save_path", str(blocker))


def test_evaluate_prints_scores_when_the_final_write_fails(models, tmp_path, monkeypatch, capsys):
    from evaluation import results

    record = {"label": "m", "notes": [], "errors": {}, "headline": {
        "mmlu": {"value": 0.4321, "task": "mmlu", "metric": "acc,none"}}}
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: record)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "save_results", full)
    code = evaluate_model.main(["--model", str(models["base"]), "--benchmarks", "mmlu",
                                "--save_path", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 2 and "0.4321" in out.out
    assert out.err.strip().splitlines()[-1].startswith("error: disk full while writing")


def test_evaluate_refuses_a_truncated_safetensors_file(models, tmp_path, capsys):
    import shutil

    model = tmp_path / "truncated"
    shutil.copytree(models["base"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = tree_hashes(model)
    code = evaluate_model.main(["--model", str(model), "--benchmarks", "mmlu",
                                "--save_path", str(tmp_path / "r")])
    assert_user_error(capsys, code, f"--model {model}", "truncated", "re-download")
    assert tree_hashes(model) == before


@pytest.mark.parametrize("content, fragment", [
    ("[1, 2]", "format a JSON list"), ("{not json", "not valid JSON")])
def test_report_names_the_bad_file(tmp_path, content, fragment, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    code = evaluate_model.main(["--report", str(bad), "--population", str(bad)])
    assert_user_error(capsys, code, "--report", str(bad), fragment)
    assert bad.read_text() == content


def test_limit_must_be_positive(models, tmp_path, capsys):
    code = evaluate_model.main(["--model", str(models["base"]), "--limit", "-3",
                                "--save_path", str(tmp_path)])
    assert_user_error(capsys, code, "--limit", "-3")


def test_threads_zero_is_refused(models, tmp_path, capsys):
    assert_user_error(capsys, merge.main(merge_args(models, tmp_path / "o", "--threads", "0")),
                      "--threads", "at least 1")


def test_humaneval_generation_is_capped_to_the_model_context(tmp_path, monkeypatch, capsys):
    """A 256-token model cannot hold lm-eval's 1024 generated tokens: cap, say so, score."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    model = build_llama(tmp_path / "short", max_position_embeddings=256)
    code = evaluate_model.main(["--model", str(model), "--benchmarks", "humaneval",
                                "--limit", "1", "--device", "cpu", "--save_path",
                                str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "humaneval: generation capped at 128 tokens (half the model's 256-token context)" in out
    (result,) = (tmp_path / "r").glob("*.json")
    assert "humaneval" in json.loads(result.read_text())["scores"]


# --- silent acceptance made loud -----------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--omega", "0.3"), ("--omega", "0.4"),  # 0.4: the default
                                         ("--calib_data", "builtin"), ("--stats", "s.safetensors")])
def test_merge_refuses_aim_flags_without_aim(models, tmp_path, flag, value, capsys):
    code = merge.main(merge_args(models, tmp_path / "o", flag, value))
    assert_user_error(capsys, code, flag, "only with --aim")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("which", ["merged", "base"])
def test_performaim_refuses_nan_weights(models, tmp_path, which, capsys):
    import shutil

    broken = tmp_path / which
    shutil.copytree(models[which], broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    before = tree_hashes(broken)
    m = {**models, which: broken}
    code = performAIM.main(aim_args(m, tmp_path / "o", "--calib_data", "builtin"))
    assert_user_error(capsys, code, "model.layers.0.mlp.down_proj.weight", "NaN or inf")
    assert tree_hashes(broken) == before and not (tmp_path / "o").exists()


def test_evaluate_warns_about_nan_weights():
    class Loaded:
        model = torch.nn.Linear(2, 2)

    assert runner.non_finite_notes(Loaded()) == []
    with torch.no_grad():
        Loaded.model.weight[0, 0] = float("nan")
    (note,) = runner.non_finite_notes(Loaded())
    assert "1 weight tensors contain NaN or inf (e.g. weight)" in note


def test_tied_lm_head_is_not_claimed_relaxed(tmp_path, caplog):
    base = build_llama(tmp_path / "base", seed=0, tie=True)
    ft = build_finetune(base, tmp_path / "ft", seed=1, scale=0.2)
    assert merge.main(["--method", "task_arithmetic", "--base_model", str(base),
                       "--models_to_merge", str(ft), "--save_path", str(tmp_path / "m")]) == 0
    with caplog.at_level(logging.INFO):
        assert performAIM.main(["--merged_model", str(tmp_path / "m"), "--pretrained_model_name",
                                str(base), "--save_path", str(tmp_path / "o"),
                                "--calib_data", "builtin", *AIM]) == 0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("AIM: relaxed")]
    assert "every hooked module relaxed" not in line
    assert "lm_head.weight not relaxed: tied to model.embed_tokens.weight" in line
