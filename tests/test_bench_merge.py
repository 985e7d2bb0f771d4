"""bench/bench_merge.py --dry-run: one config per registered method, the same merge for mergekit
(less our own keys) where mergekit has the method."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

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


def test_a_rerun_deletes_only_earlier_benchmark_outputs(tmp_path):
    import pytest

    bench = bench_module()
    ours, theirs, mine = tmp_path / "ours_ties", tmp_path / "mergekit_ties", tmp_path / "my_model"
    for folder, marker in ((ours, "merge_recipe.yaml"), (theirs, "mergekit_config.yml"),
                           (mine, "config.json")):
        folder.mkdir()
        (folder / marker).write_text("x")
        (folder / "model.safetensors").write_bytes(b"weights")
    bench.remove_output(ours)
    bench.remove_output(theirs)
    bench.remove_output(tmp_path / "absent")
    with pytest.raises(SystemExit, match="not an output of this benchmark"):
        bench.remove_output(mine)
    assert not ours.exists() and not theirs.exists()
    assert (mine / "model.safetensors").read_bytes() == b"weights"


def test_vocab_comparison_refuses_a_folder_it_did_not_write(tmp_path):
    """bench/vocab_vs_mergekit.py overwrites its outputs under --out: a folder holding someone
    else's files is refused before anything is written, and kept."""
    (tmp_path / "mine.txt").write_text("keep")
    run = subprocess.run([sys.executable, str(REPO / "bench" / "vocab_vs_mergekit.py"),
                          "--mergekit", "unused", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "holds files this script did not write" in run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
