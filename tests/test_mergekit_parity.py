"""bench/mergekit_parity.py's pure parts: the comparisons on hand-made tensors and configs, and
the configs it derives for a family (no mergekit here)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from merging_methods.mergekit_config import load_config
from merging_methods.mergekit_methods import IN_MERGEKIT
from tests.tiny_models import build_finetune, build_llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("mergekit_parity",
                                                  REPO / "bench" / "mergekit_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exact_comparison_finds_the_worst_tensor_of_each_measure(parity):
    ours = {"a": torch.tensor([1.0, 2.0, -4.0]), "b": torch.tensor([0.5, 0.5]),
            "c": torch.tensor([1.0, 4.0 + 2e-5])}
    theirs = {"a": torch.tensor([1.0, 2.5, -4.0]), "b": torch.tensor([0.5, 0.25]),
              "c": torch.tensor([1.0, 4.0])}
    result = parity.compare_exact(["a", "b", "c"], ours.get, theirs.get)
    # a: 0.5 absolute, 0.5 / 4 relative; b: 0.25 absolute, 0.25 / 0.5 relative; c: 2e-5
    # absolute, 5e-6 relative, within REL_TOL (1e-5), so a and b hold the 2 entries beyond it
    assert result == {"kind": "exact", "max_abs": 0.5, "worst_abs": "a", "max_rel": 0.5,
                      "worst_rel": "b", "entries_over_tol": 2, "entries": 7}
    one_ulp = parity.tensor_diff(torch.tensor([1.0078125, 2.0], dtype=torch.bfloat16),
                                 torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    assert one_ulp == (2.0 ** -7, 2.0 ** -8, 1)
    same = parity.compare_exact(["a"], ours.get, ours.get)
    assert same["max_abs"] == 0 and same["worst_abs"] is None and same["entries_over_tol"] == 0


def test_statistics_compare_changed_fractions_and_delta_norms(parity):
    base = {"a": torch.zeros(4), "c": torch.ones(2)}
    ours = {"a": torch.tensor([0.0, 1.0, 0.0, 2.0]), "c": torch.tensor([1.0, 3.0])}
    theirs = {"a": torch.tensor([3.0, 0.0, 0.0, 0.0]), "c": torch.tensor([2.0, 1.0])}
    result = parity.compare_statistics(["a", "c"], ours.get, theirs.get, base.get)
    # changed: a 2/4 vs 1/4, c 1/2 vs 1/2 (3/6 vs 2/6 overall); delta norms a sqrt(5) vs 3, c 2:1
    assert result["changed_ours"] == 0.5 and result["changed_mergekit"] == pytest.approx(1 / 3)
    assert result["max_changed_gap"] == 0.25 and result["worst_gap"] == "a"
    assert result["l2_ratio_min"] == pytest.approx(math.sqrt(5) / 3)
    assert result["l2_ratio_max"] == pytest.approx(2.0)
    assert result["l2_ratio"] == pytest.approx(math.sqrt(9 / 10))


def test_config_fields_compare_across_transformers_versions(parity):
    ours = {"num_hidden_layers": 4, "vocab_size": 1000, "torch_dtype": "float32"}
    assert parity.config_mismatches(ours, {**ours, "torch_dtype": None, "dtype": "float32"}) == {}
    theirs = {"num_hidden_layers": 2, "vocab_size": 1000, "dtype": "bfloat16"}
    assert parity.config_mismatches(ours, theirs) == {
        "num_hidden_layers": [4, 2], "torch_dtype": ["float32", "bfloat16"]}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    family = tmp_path_factory.mktemp("family")
    base = build_llama(family / "base", seed=0, num_hidden_layers=4)
    for i in (1, 2, 3):
        build_finetune(base, family / f"expert{i}", seed=i)
    return family


def test_configs_for_every_shared_method_in_the_family_dtype(parity, family, tmp_path):
    assert parity.SHARED == sorted(IN_MERGEKIT)
    assert parity.family_experts(family) == [str(family / f"expert{i}") for i in (1, 2, 3)]
    configs = parity.parity_configs(family, parity.SHARED, 0.5, tmp_path)
    assert list(configs) == parity.SHARED
    for method, (ours, theirs) in configs.items():
        for config in (load_config(str(ours)), load_config(str(theirs))):
            assert config.merge_method == method and config.out_dtype == "float32"
    with pytest.raises(SystemExit, match="--methods: widen is not a method both tools have"):
        parity.parity_configs(family, ["ties", "widen"], 0.5, tmp_path)


def test_outputs_compare_every_common_tensor(parity, family):
    base, expert = family / "base", family / "expert1"
    exact = parity.compare_outputs(expert, base, base, stochastic=False)
    from checkpoints.checkpoint import CheckpointReader

    a, b = CheckpointReader(expert, "e"), CheckpointReader(base, "b")
    largest = max((a.get(n).double() - b.get(n).double()).abs().max().item() for n in a.names)
    assert exact["max_abs"] == largest and exact["tensors"] == len(a.names)
    assert exact["only_ours"] == exact["only_mergekit"] == [] and exact["config_mismatches"] == {}
    same = parity.compare_outputs(expert, expert, base, stochastic=True)
    assert same["max_changed_gap"] == 0.0 and same["l2_ratio"] == pytest.approx(1.0)
    row = parity.table({"ties": exact}).splitlines()[2]
    assert row.startswith("| ties | every entry |") and row.endswith("| agrees |")
