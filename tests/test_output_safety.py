"""Issue 11, data loss: outputs never replace inputs or foreign folders, and crash leftovers go.

Every refusal is checked for its exit code, its one-line message and that no input file changed
(SHA-256 of every file before and after).
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import merge
import performAIM
from checkpoints.output import _replace, clear_leftovers
from checkpoints.record import RECIPE_FILE
from tests.test_merge_cli import assert_user_error
from tests.tiny_models import build_finetune, build_llama

REPO = Path(__file__).resolve().parents[1]
AIM = ["--calib_data", "builtin", "--calib_samples", "4", "--block_size", "128"]


def tree_hashes(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file below `roots` (hidden ones too)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models/{base, ft1, merged}: a base, a fine-tune and their merge, all in one folder."""
    root = tmp_path_factory.mktemp("safety") / "models"
    base = build_llama(root / "base", seed=0)
    ft = build_finetune(base, root / "ft1", seed=1, scale=0.2)
    merged = root / "merged"
    assert merge.main(["--method", "task_arithmetic", "--base_model", str(base),
                       "--models_to_merge", str(ft), "--save_path", str(merged)]) == 0
    return dict(root=root, base=base, ft=ft, merged=merged)


def merge_args(m: dict, save_path, *extra: str) -> list[str]:
    return ["--method", "task_arithmetic", "--base_model", str(m["base"]),
            "--models_to_merge", str(m["ft"]), "--save_path", str(save_path), *extra]


def aim_args(m: dict, save_path, *extra: str) -> list[str]:
    return ["--merged_model", str(m["merged"]), "--pretrained_model_name", str(m["base"]),
            "--save_path", str(save_path), *AIM, *extra]


@pytest.mark.parametrize("which", ["merged", "base"])
def test_performaim_refuses_its_input_as_output_even_with_overwrite(models, which, capsys):
    before = tree_hashes(models["root"])
    code = performAIM.main(aim_args(models, models[which], "--overwrite"))
    assert_user_error(capsys, code, "--save_path", "is the input", "outside every input")
    assert tree_hashes(models["root"]) == before


@pytest.mark.parametrize("script", ["merge", "performAIM"])
def test_output_may_not_contain_an_input(models, script, capsys):
    before = tree_hashes(models["root"])
    if script == "merge":
        code = merge.main([*merge_args(models, models["root"]), "--overwrite"])
    else:
        code = performAIM.main(aim_args(models, models["root"], "--overwrite"))
    assert_user_error(capsys, code, f"--save_path: {models['root']} contains the input")
    assert tree_hashes(models["root"]) == before


@pytest.mark.parametrize("script", ["merge", "performAIM"])
def test_output_may_not_lie_inside_an_input(models, script, capsys):
    """Nothing is written inside an input model folder: the input stays byte for byte."""
    before = tree_hashes(models["root"])
    inside = models["base"] / "out"
    if script == "merge":
        code = merge.main(merge_args(models, inside))
    else:
        code = performAIM.main(aim_args(models, inside))
    assert_user_error(capsys, code, f"--save_path: {inside} is inside the input")
    assert tree_hashes(models["root"]) == before


@pytest.mark.parametrize("target", [".", ".."])
def test_output_may_not_be_the_working_directory_or_above(models, tmp_path, monkeypatch, target,
                                                          capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = tree_hashes(tmp_path, models["root"])
    code = merge.main([*merge_args(models, target), "--overwrite"])
    assert_user_error(capsys, code, "is the working directory or one of its parents")
    assert tree_hashes(tmp_path, models["root"]) == before


def test_overwrite_replaces_only_empty_folders_and_earlier_outputs(models, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("weeks of work")
    before = tree_hashes(foreign, models["root"])
    assert_user_error(capsys, merge.main([*merge_args(models, foreign), "--overwrite"]),
                      RECIPE_FILE, "not an earlier output", "choose another path")
    assert_user_error(capsys, performAIM.main(aim_args(models, foreign, "--overwrite")),
                      RECIPE_FILE, "not an earlier output")
    assert tree_hashes(foreign, models["root"]) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge.main([*merge_args(models, empty), "--overwrite"]) == 0
    (empty / "stale.txt").write_text("from the earlier output")
    assert merge.main([*merge_args(models, empty), "--overwrite"]) == 0   # holds a recipe: ours
    assert not (empty / "stale.txt").exists() and (empty / RECIPE_FILE).is_file()
    assert not list(tmp_path.glob(".*"))


def test_stats_file_inside_the_output_is_refused(models, tmp_path, capsys):
    """--stats is an input too: an output folder holding it would delete it on overwrite."""
    out = tmp_path / "out"
    assert merge.main(merge_args(models, out)) == 0
    stats = out / "stats.safetensors"
    stats.write_bytes(b"pretend statistics")
    before = tree_hashes(out)
    code = performAIM.main(aim_args(models, out, "--overwrite", "--stats", str(stats)))
    assert_user_error(capsys, code, "contains the input", "stats.safetensors")
    assert tree_hashes(out) == before


@pytest.mark.parametrize("omegas", ["0.4,0.4", "0.4,0.40"])
def test_equal_omegas_write_one_output_and_hide_nothing(models, tmp_path, omegas):
    before = tree_hashes(models["root"])
    out = tmp_path / "aim"
    assert performAIM.main(aim_args(models, out, "--omega", omegas)) == 0
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aim"]   # no hidden folder, no _omega
    assert tree_hashes(models["root"]) == before


def test_omegas_that_name_the_same_folder_are_refused(models, tmp_path, capsys):
    code = performAIM.main(aim_args(models, tmp_path / "aim", "--omega", "0.4,0.4000001"))
    assert_user_error(capsys, code, "--omega", "same output folder")
    assert not list(tmp_path.iterdir())


def test_a_failed_replace_puts_the_earlier_output_back(tmp_path):
    """The original failure: the staged folder vanished before its rename (FileNotFoundError)."""
    save = tmp_path / "out"
    save.mkdir()
    (save / RECIPE_FILE).write_text("earlier output")
    with pytest.raises(FileNotFoundError):
        _replace(tmp_path / ".out.partial-1-gone", save)
    assert (save / RECIPE_FILE).read_text() == "earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_runs_go_those_of_live_runs_stay(tmp_path, caplog):
    save = tmp_path / "out"
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.partial-{dead}"                  # the name before issue 11
    stale_new = tmp_path / f".out.partial-{dead}-0a1b2c3d"
    running = tmp_path / f".out.partial-{live}-00000000"
    other = tmp_path / f".other.partial-{dead}"                # another output's: not ours
    moved_aside = tmp_path / f".out.old-{dead}-0a1b2c3d"       # killed between the two renames
    for folder in (stale, stale_new, running, other, moved_aside):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    (moved_aside / RECIPE_FILE).write_text("earlier output")
    with caplog.at_level(logging.WARNING):
        clear_leftovers(save)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [running.name, other.name, "out"])
    assert (save / RECIPE_FILE).read_text() == "earlier output"
    removed = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert len(removed) == 2 and all(f"pid {dead}" in m and "killed" in m for m in removed)
    assert any("restored" in r.getMessage() for r in caplog.records)


def test_sigkill_mid_merge_then_rerun_removes_the_stale_folder(tmp_path):
    base = build_llama(tmp_path / "base", seed=0, hidden_size=256, intermediate_size=1024,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    ft = build_finetune(base, tmp_path / "ft1", seed=1)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "merge.py"), "--method", "ties", "--density", "0.3",
           "--base_model", str(base), "--models_to_merge", str(ft), "--save_path", str(out),
           "--max_shard_size", "20KB"]
    before = tree_hashes(base, ft)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(
            p.glob("*.safetensors") for p in tmp_path.glob(".out.partial-*")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (stale,) = tmp_path.glob(".out.partial-*")
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    (line,) = [ln for ln in rerun.stderr.splitlines() if "left by a run" in ln]
    assert str(stale) in line and f"pid {proc.pid}" in line and "killed" in line
    assert not list(tmp_path.glob(".out.*")) and (out / RECIPE_FILE).is_file()
    assert tree_hashes(base, ft) == before
