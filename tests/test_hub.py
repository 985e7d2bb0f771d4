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


@pytest.fixture
def fake_hub(monkeypatch):
    """A reachable Hub whose downloads are recorded: (repo_id, revision, local_files_only) ->
    the folder `folders[repo_id]`."""
    import huggingface_hub

    calls, folders = [], {}

    def snapshot_download(repo_id, revision=None, local_files_only=False, **_):
        calls.append((repo_id, revision, local_files_only))
        return str(folders[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo_id, revision=None: ["model.safetensors"])
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    return calls, folders


def test_a_hub_revision_reaches_the_download(fake_hub, tmp_path, monkeypatch):
    calls, folders = fake_hub
    folders["org/name"] = tmp_path
    assert resolve_model_dir("org/name@v1.0", "--base_model") == tmp_path
    assert resolve_model_dir("org/name", "--base_model") == tmp_path
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    assert resolve_model_dir("org/name@abc123", "--base_model") == tmp_path   # from the cache
    assert calls == [("org/name", "v1.0", False), ("org/name", None, False),
                     ("org/name", "abc123", True)]


def test_a_local_folder_has_no_revisions(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: pytest.fail("asked the hub"))
    with pytest.raises(UserError, match=r"^--base_model: m@v1: m is a local folder, which has no "
                       r"revisions; drop @v1 or give a hub id$"):
        resolve_model_dir("m@v1", "--base_model")


def test_a_config_merges_a_hub_revision_and_records_it(fake_hub, tmp_path):
    """`{model: {path: org/ft, revision: v2}}` (read as `org/ft@v2`, test_mergekit_config)
    downloads revision v2; merge_recipe.yaml names the model with its revision."""
    import yaml

    import merge
    from tests.tiny_models import build_finetune, build_llama

    calls, folders = fake_hub
    base = build_llama(tmp_path / "base", seed=0)
    folders["org/ft"] = build_finetune(base, tmp_path / "ft", seed=1)
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                      "  - model: {model: {path: org/ft, revision: v2}}\n"
                      "    parameters: {weight: 0.5}\n")
    out = tmp_path / "out"
    assert merge.main(["--config", str(config), "--save_path", str(out)]) == 0
    record = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert record["models"][0]["model"] == "org/ft@v2"
    assert record["merge"]["models"] == ["org/ft@v2"]
    assert calls and set(calls) == {("org/ft", "v2", False)}
