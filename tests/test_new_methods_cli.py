"""End to end, every method added by issue 12 through merge.py on tiny tied checkpoints: the
output loads in transformers, and inline AIM (merge.py --aim) equals performAIM.py on it."""
from __future__ import annotations

import pytest
import torch

import merge
import performAIM
from tests.method_cases import NEW_METHODS, case
from tests.test_aim_cli import CALIB
from tests.test_merge_cli import assert_user_error, load_weights
from tests.tiny_models import build_finetune, build_llama


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied base (fp32, so inline AIM, which relaxes before the output cast, equals post-hoc
    AIM bit for bit), three fine-tunes (two bf16) and the base's AIM statistics."""
    root = tmp_path_factory.mktemp("tied")
    base = build_llama(root / "base", seed=0, tie=True, max_shard_size="40KB")
    fts = [build_finetune(base, root / f"ft{i}", seed=i, scale=0.2,
                          dtype=torch.float32 if i == 2 else torch.bfloat16) for i in (1, 2, 3)]
    stats = root / "stats.safetensors"
    assert performAIM.main(["--merged_model", str(fts[0]), "--pretrained_model_name", str(base),
                            "--save_path", str(root / "aim"), "--calib_data", "builtin",
                            "--stats", str(stats), *CALIB]) == 0
    return base, fts, stats


@pytest.mark.parametrize("method", NEW_METHODS)
def test_merges_loads_and_inline_aim_equals_post_hoc(tied, tmp_path, method):
    from transformers import AutoModelForCausalLM

    base, fts, stats = tied
    models, flags, _ = case(method, fts)
    common = ["--method", method, "--base_model", str(base), "--models_to_merge",
              ",".join(map(str, models)), *flags]
    aim = ["--omega", "0.4", "--calib_data", "builtin", "--stats", str(stats), *CALIB]
    plain, inline, post = tmp_path / "plain", tmp_path / "inline", tmp_path / "post"
    assert merge.main([*common, "--save_path", str(plain)]) == 0
    assert merge.main([*common, "--save_path", str(inline), "--aim", *aim]) == 0
    assert performAIM.main(["--merged_model", str(plain), "--pretrained_model_name", str(base),
                            "--save_path", str(post), *aim]) == 0
    got, want = load_weights(inline), load_weights(post)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert "lm_head.weight" not in got      # a tied base gives a tied output
    model = AutoModelForCausalLM.from_pretrained(plain)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


@pytest.mark.parametrize("method, n, extra, fragment", [
    ("slerp", 2, [], "slerp takes exactly 1 model(s) besides --base_model, got 2"),
    ("model_stock", 1, [], "model_stock takes at least 2 model(s) besides --base_model, got 1"),
    ("della", 2, ["--density", "0.9"], "--epsilon: epsilon must keep density ± epsilon"),
    ("free_merging", 2, [], "--free_task_model: name one of the merged models; it is required"),
    ("free", 2, ["--free_task_model", "elsewhere"], "--free_task_model: 'elsewhere' is not one"),
    ("breadcrumbs", 2, ["--gamma", "1.5"], "--gamma: 1.5 is outside the allowed range"),
    ("della_linear", 2, ["--rescale_mode", "inverse_density"], "--rescale_mode: expected one of l1, inverse_prob"),
])
def test_bad_settings_are_one_line_errors(tied, tmp_path, capsys, method, n, extra, fragment):
    base, fts, _ = tied
    code = merge.main(["--method", method, "--base_model", str(base), "--models_to_merge",
                       ",".join(map(str, fts[:n])), "--save_path", str(tmp_path / "o"), *extra])
    assert_user_error(capsys, code, fragment)


@pytest.mark.parametrize("alias, method", [("fourier", "fr_merging"), ("free", "free_merging")])
def test_aliases_record_their_method_and_free_its_task_model(tied, tmp_path, alias, method):
    import yaml

    base, fts, _ = tied
    out = tmp_path / alias
    task = ["--free_task_model", str(fts[1])] if alias == "free" else []
    assert merge.main(["--method", alias, "--base_model", str(base), "--models_to_merge",
                       ",".join(map(str, fts[:2])), "--save_path", str(out), *task]) == 0
    record = yaml.safe_load((out / "merge_recipe.yaml").read_text())["merge"]
    assert record["method"] == method
    assert record["params"].get("task_model") == (str(fts[1]) if task else None)
