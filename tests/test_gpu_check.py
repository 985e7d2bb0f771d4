"""bench/gpu_check.sh and its helper, as far as a machine without a GPU can check them (the
whole script's `--cpu-dry-run` takes minutes and is run by hand)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bench import gpu_check

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_mask_check_on_cpu(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "MASK_CASES", [(0, 1, "w", 0.3, 5, 1001)])
    assert gpu_check.check_masks("cpu")
    assert "masks: cpu == cpu bit for bit on 1 ranges" in capsys.readouterr().out


def test_compare_outputs(tmp_path):
    tensors = {"a": torch.arange(6.0), "b": torch.ones(2, 2)}
    for name, shift in (("x", 0.0), ("y", 0.0), ("z", 0.5)):
        (tmp_path / name).mkdir()
        save_file({**tensors, "a": tensors["a"] + shift * (torch.arange(6) == 2)},
                  tmp_path / name / "model.safetensors")
    assert gpu_check.compare_outputs(tmp_path / "x", tmp_path / "y") == "bit-equal"
    assert gpu_check.compare_outputs(tmp_path / "x", tmp_path / "z") == "10.00% differ, max |diff| 0.5"


def test_merges_section_on_cpu(tmp_path, capsys):
    """The merges section end to end on a tiny family (CPU for both sides): every output
    agrees bit for bit, and the section removes its outputs, leaving the family alone."""
    family = tmp_path / "family"
    subprocess.run([sys.executable, str(SCRIPT.parent / "make_family.py"), "--out", str(family),
                    "--hidden", "64", "--layers", "2", "--intermediate", "128", "--vocab", "512"],
                   check=True, capture_output=True)
    before = sorted(p.name for p in family.iterdir())
    work = tmp_path / "work"
    work.mkdir()
    assert gpu_check.run_merges(family, "cpu", work, ["task_arithmetic", "ties"])
    out = capsys.readouterr().out
    assert "task_arithmetic: cpu" in out and "bit-equal" in out
    assert not any((work / f"{m}_{d}").exists() for m in ("task_arithmetic", "ties")
                   for d in ("cpu", "device"))
    assert sorted(p.name for p in family.iterdir()) == before
