"""bench/bench_merge.py --dry-run: one config per registered method, the same merge for mergekit
(less our own keys) where mergekit has the method."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from merging_methods.mergekit_config import load_config
from merging_methods.mergekit_methods import IN_MERGEKIT
from merging_methods.registry import METHODS
from tests.tiny_models import build_finetune, build_llama

REPO = Path(__file__).resolve().parents[1]


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_merge", REPO / "bench" / "bench_merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_a_config_per_method(tmp_path, capsys):
    family = tmp_path / "family"
    base = build_llama(family / "base", seed=0, num_hidden_layers=4)
    for i in (1, 2, 3):
        build_finetune(base, family / f"expert{i}", seed=i)
    bench = bench_module()
    work = tmp_path / "work"
    assert bench.main(["--family", str(family), "--work", str(work), "--dry-run"]) == 0
    assert set(bench.METHODS) == set(METHODS)
    for method in METHODS:
        ours = load_config(str(work / f"ours_{method}.yml"))
        assert ours.merge_method == method
        theirs = work / f"mergekit_{method}.yml"
        assert theirs.exists() == (method in IN_MERGEKIT)
        if theirs.exists():
            text = theirs.read_text()
            load_config(text)
            assert "seed" not in yaml.safe_load(text) and "rescale_mode" not in text
    stacked = load_config(str(work / "ours_passthrough.yml"))
    assert [s.sources[0].layer_range for s in stacked.slices] == [(0, 2), (2, 4)]
    assert "# dare_ties" in capsys.readouterr().out


def test_a_rerun_deletes_only_earlier_benchmark_outputs(tmp_path, monkeypatch):
    """Only a folder holding a tool's marker is deleted, and never one that is, holds or lies
    inside the family (the inputs) or holds the working directory, marker or not."""
    bench = bench_module()
    family = tmp_path / "family"
    ours, theirs, mine = tmp_path / "ours_ties", tmp_path / "mergekit_ties", tmp_path / "my_model"
    inside, cwd_holder = family / "ours_ties", tmp_path / "ours_slerp"
    for folder, marker in ((ours, "merge_recipe.yaml"), (theirs, "mergekit_config.yml"),
                           (mine, "config.json"), (family, "merge_recipe.yaml"),
                           (inside, "merge_recipe.yaml"), (cwd_holder, "merge_recipe.yaml")):
        folder.mkdir()
        (folder / marker).write_text("x")
        (folder / "model.safetensors").write_bytes(b"weights")
    (cwd_holder / "here").mkdir()
    monkeypatch.chdir(cwd_holder / "here")
    bench.remove_output(ours, family)
    bench.remove_output(theirs, family)
    bench.remove_output(tmp_path / "absent", family)
    with pytest.raises(SystemExit, match="not an output of this benchmark"):
        bench.remove_output(mine, family)
    for folder, message in ((family, "is the input"), (inside, "is inside the input"),
                            (tmp_path, "contains the input"),
                            (cwd_holder, "working directory")):
        with pytest.raises(SystemExit, match=message):
            bench.remove_output(folder, family)
    assert not ours.exists() and not theirs.exists()
    for folder in (mine, family, inside, cwd_holder):
        assert (folder / "model.safetensors").read_bytes() == b"weights"


def test_a_work_folder_inside_the_family_is_refused_before_anything_is_written(tmp_path):
    bench = bench_module()
    family = tmp_path / "family"
    (family / "base").mkdir(parents=True)
    with pytest.raises(SystemExit, match="is inside the input"):
        bench.main(["--family", str(family), "--work", str(family / "base" / "w"),
                    "--methods", "ties", "--dry-run"])
    assert sorted(p.name for p in family.rglob("*")) == ["base"]


def test_vocab_comparison_refuses_a_folder_it_did_not_write(tmp_path):
    """bench/vocab_vs_mergekit.py overwrites its outputs under --out: a folder holding someone
    else's files is refused before anything is written, and kept."""
    (tmp_path / "mine.txt").write_text("keep")
    run = subprocess.run([sys.executable, str(REPO / "bench" / "vocab_vs_mergekit.py"),
                          "--mergekit", "unused", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "holds files this script did not write" in run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
