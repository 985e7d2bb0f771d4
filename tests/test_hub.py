"""Offline behaviour: hub look-ups fail in seconds when the Hub is unreachable, a local folder
named like a hub id is used without asking the Hub, and our code tasks override nothing."""
from __future__ import annotations

import logging
import time

import pytest

from checkpoints import hub
from checkpoints.checkpoint import resolve_model_dir
from checkpoints.errors import UserError

CLOSED_PORT = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused


@pytest.fixture
def hub_down(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_unreachable_hub_is_named_and_offline_mode_counts_as_unreachable(hub_down, monkeypatch):
    from huggingface_hub import constants

    assert "127.0.0.1" in hub.hub_unreachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub.hub_unreachable() is None  # behind a proxy a direct probe proves nothing
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_unreachable() == "HF_HUB_OFFLINE is set"


def test_merge_fails_in_seconds_with_one_line_when_the_hub_is_unreachable(hub_down, tmp_path, capsys):
    import merge

    start = time.time()
    code = merge.main(["--method", "linear", "--base_model", "nobody/no-such-model",
                       "--models_to_merge", "nobody/a,nobody/b", "--save_path", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and time.time() - start < 10
    assert err[-1].startswith("error: --base_model: 'nobody/no-such-model' is no local folder")
    assert "unreachable" in err[-1] and "pass a local folder" in err[-1]


def test_calibration_and_evaluation_fail_fast_on_hub_ids(hub_down, monkeypatch):
    import datasets

    from calibration.sources import load_texts
    from evaluation.backends import check_model

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match="--calib_data nobody/texts: the Hugging Face Hub is unreachable"):
        load_texts("nobody/texts")
    with pytest.raises(UserError, match="--model nobody/model: no such folder, and the Hugging Face"):
        check_model("nobody/model")


def test_a_local_folder_named_like_a_hub_id_never_asks_the_hub(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: pytest.fail("asked the hub"))
    assert resolve_model_dir("org/name", "--base_model").resolve() == tmp_path / "org" / "name"


def test_our_code_tasks_override_no_lm_eval_task(caplog):
    from lm_eval.tasks import TaskManager

    from evaluation.benchmarks import BENCHMARKS
    from evaluation.runner import PROJECT_TASKS

    with caplog.at_level(logging.WARNING):
        manager = TaskManager(include_path=str(PROJECT_TASKS))
    assert not [r for r in caplog.records if "overrides existing task" in r.getMessage()]
    for name in ("humaneval", "mbpp"):  # ours, by the table, and lm-eval's own, side by side
        assert BENCHMARKS[name].task == f"{name}_offline"
        assert {name, f"{name}_offline"} <= set(manager.all_tasks)
