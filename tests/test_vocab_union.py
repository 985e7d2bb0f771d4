"""merge.py --vocab union (ALGORITHMS.md §13.1 steps 1-4): the examples of the spec, worked by hand."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import merge
import performAIM
from tests.test_aim_cli import CALIB
from tests.test_merge_cli import assert_user_error, load_weights
from tests.tiny_models import build_finetune, build_llama

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base (V0 rows) and fine-tunes adding [PAD], <pad>, or nothing to the vocabulary."""
    root = tmp_path_factory.mktemp("union")
    base = build_llama(root / "base", seed=0)
    return dict(
        root=root, base=base,
        pad=build_finetune(base, root / "pad", seed=1, added_tokens=("[PAD]",)),
        angle=build_finetune(base, root / "angle", seed=2, added_tokens=("<pad>",)),
        plain=build_finetune(base, root / "plain", seed=3),
        bare_row=build_finetune(base, root / "bare_row", seed=4, extra_rows=1),
    )


def union_merge(zoo, out, *models, method="task_arithmetic") -> int:
    return merge.main(["--method", method, "--base_model", str(zoo["base"]), "--models_to_merge",
                       ",".join(str(zoo[m]) for m in models), "--save_path", str(out),
                       "--vocab", "union"])


def mean_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """n copies of the float64 mean of t's rows (the reference's resize fill)."""
    return t.double().mean(0, keepdim=True).expand(n, -1)


def grown(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t.double(), mean_rows(t, rows - t.shape[0])])


def union_reference(zoo, models: tuple[str, ...], rows: int) -> dict[str, torch.Tensor]:
    """Dense float64 task arithmetic of embedding and head over the hand-grown matrices."""
    b = load_weights(zoo["base"])
    others = [load_weights(zoo[m]) for m in models]
    return {name: grown(b[name], rows) + sum(grown(o[name], rows) - grown(b[name], rows)
                                             for o in others) for name in (EMBED, HEAD)}


def test_example_a_one_added_pad_token(zoo, tmp_path):
    """32001 vs 32000: the base and the plain fine-tune gain a mean row; the delta of the new
    row is (fine-tune's pad row) - (base mean row) + (plain's mean row - base mean row)."""
    out = tmp_path / "a"
    assert union_merge(zoo, out, "pad", "plain") == 0
    got = load_weights(out)
    v0 = load_weights(zoo["base"])[EMBED].shape[0]
    for name, want in union_reference(zoo, ("pad", "plain"), v0 + 1).items():
        assert got[name].shape == want.shape
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == v0 + 1
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == v0 + 1 and tok.convert_tokens_to_ids("[PAD]") == v0
    assert tok.pad_token == "[PAD]"
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("[PAD] The quick brown fox", return_tensors="pt").input_ids
    assert ids[0, 0] == v0
    assert torch.isfinite(model(ids).logits).all()


def test_example_b_two_different_pad_tokens_align_by_position(zoo, tmp_path):
    """[PAD] and <pad> both at id V0 in their fine-tunes: rows align by position; each fine-tune
    gains one mean row (its own V0 + 1 rows averaged), the base two; order = first appearance."""
    out = tmp_path / "b"
    assert union_merge(zoo, out, "pad", "angle") == 0
    b, p, a = (load_weights(zoo[k]) for k in ("base", "pad", "angle"))
    got = load_weights(out)
    v0 = b[EMBED].shape[0]
    for name, want in union_reference(zoo, ("pad", "angle"), v0 + 2).items():
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6)
        # row V0 holds [PAD] of one fine-tune and <pad> of the other
        torch.testing.assert_close(got[name][v0].double(), p[name][v0].double()
                                   + a[name][v0].double() - b[name].double().mean(0))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["[PAD]", "<pad>"]) == [v0, v0 + 1]
    assert tok.pad_token == "<pad>"   # each addition re-assigns the pad token, as the reference
    swapped = tmp_path / "swapped"
    assert union_merge(zoo, swapped, "angle", "pad") == 0
    assert AutoTokenizer.from_pretrained(swapped).convert_tokens_to_ids(
        ["<pad>", "[PAD]"]) == [v0, v0 + 1]


def test_union_without_added_tokens_is_the_base_vocabulary(zoo, tmp_path):
    out_union, out_base = tmp_path / "u", tmp_path / "b"
    assert union_merge(zoo, out_union, "plain") == 0
    assert merge.main(["--method", "task_arithmetic", "--base_model", str(zoo["base"]),
                       "--models_to_merge", str(zoo["plain"]), "--save_path", str(out_base)]) == 0
    got, want = load_weights(out_union), load_weights(out_base)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_recipe_file_reproduces_a_union_merge(zoo, tmp_path):
    """merge_recipe.yaml records --vocab union under our own `vocab` key (mergekit's
    `tokenizer_source: union` aligns by token, a different union), and reproduces it."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert union_merge(zoo, first, "pad", "angle") == 0
    record = yaml.safe_load((first / "merge_recipe.yaml").read_text())
    assert record["vocab"] == "union" and "tokenizer_source" not in record
    assert merge.main(["--config", str(first / "merge_recipe.yaml"), "--save_path",
                       str(again)]) == 0
    got, want = load_weights(again), load_weights(first)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (AutoTokenizer.from_pretrained(again).get_vocab()
            == AutoTokenizer.from_pretrained(first).get_vocab())


def aligned_copy(src, dst, rows: int):
    """src with its embedding and head grown to `rows` by mean rows, saved as a plain
    checkpoint declaring `rows` tokens (what --vocab union should merge)."""
    weights = load_weights(src)
    for name in (EMBED, HEAD):
        t = weights[name]
        mean = t.double().mean(0, keepdim=True).to(t.dtype)
        weights[name] = torch.cat([t, mean.expand(rows - t.shape[0], -1)]).contiguous()
    dst.mkdir()
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    return dst


@pytest.mark.parametrize("method", ["ties", "widen", "dare_ties"])
def test_union_equals_merging_hand_aligned_checkpoints(zoo, tmp_path, method):
    """Whole-tensor methods (and DARE) see exactly the rows of hand-grown checkpoints."""
    density = ["--density", "0.5"] if method != "widen" else []
    out = tmp_path / "union"
    assert merge.main(["--method", method, "--base_model", str(zoo["base"]), "--models_to_merge",
                       f"{zoo['pad']},{zoo['plain']}", "--save_path", str(out), "--vocab", "union",
                       *density]) == 0
    rows = load_weights(zoo["pad"])[EMBED].shape[0]
    aligned = [aligned_copy(zoo[k], tmp_path / k, rows) for k in ("base", "pad", "plain")]
    ref = tmp_path / "reference"
    assert merge.main(["--method", method, "--base_model", str(aligned[0]), "--models_to_merge",
                       f"{aligned[1]},{aligned[2]}", "--save_path", str(ref), *density]) == 0
    got, want = load_weights(out), load_weights(ref)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def drop_last_row(folder):
    """Remove the last vocabulary row of a checkpoint (weights and config)."""
    weights = load_weights(folder)
    for name in (EMBED, HEAD):
        weights[name] = weights[name][:-1].contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] - 1}))


def test_tokens_beyond_the_rows_are_dropped(zoo, tmp_path):
    """Step 2: a tokenizer naming more added tokens than rows loses the surplus from its end."""
    two = build_finetune(zoo["base"], tmp_path / "two", seed=6, added_tokens=("[PAD]", "<extra>"))
    drop_last_row(two)
    out = tmp_path / "out"
    assert merge.main(["--method", "task_arithmetic", "--base_model", str(zoo["base"]),
                       "--models_to_merge", f"{two},{zoo['angle']}", "--save_path", str(out),
                       "--vocab", "union"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    v0 = load_weights(zoo["base"])[EMBED].shape[0]
    assert len(tok) == v0 + 2 and "<extra>" not in tok.get_vocab()
    assert tok.convert_tokens_to_ids(["[PAD]", "<pad>"]) == [v0, v0 + 1]


def test_union_errors_exit_2(zoo, tmp_path, capsys):
    assert_user_error(capsys, union_merge(zoo, tmp_path / "e1", "bare_row"),
                      "--vocab union", "1 rows beyond the base vocabulary", "--vocab base")
    small = tmp_path / "small"   # embedding rows beyond the tokenizer's length
    rows = load_weights(zoo["base"])[EMBED].shape[0]
    build_llama(small, seed=0, vocab_size=rows + 3, tokenizer_from=zoo["base"])
    code = merge.main(["--method", "task_arithmetic", "--base_model", str(small),
                       "--models_to_merge", str(small), "--save_path", str(tmp_path / "e2"),
                       "--vocab", "union"])
    assert_user_error(capsys, code, "--vocab union", "base tokenizer has")
    fewer = build_finetune(zoo["base"], tmp_path / "fewer", seed=5)
    drop_last_row(fewer)
    code = merge.main(["--method", "task_arithmetic", "--base_model", str(zoo["base"]),
                       "--models_to_merge", str(fewer), "--save_path", str(tmp_path / "e3"),
                       "--vocab", "union"])
    assert_user_error(capsys, code, "fewer than the base's")
    assert not any((tmp_path / e).exists() for e in ("e1", "e2", "e3"))


def test_aim_on_a_union_merge_inline_equals_post_hoc(zoo, tmp_path):
    """The grown rows are relaxed toward the base's mean rows both inline and by performAIM."""
    stats = ["--calib_data", "builtin", "--stats", str(tmp_path / "stats.safetensors"), *CALIB]
    merged, post_hoc, inline = tmp_path / "merged", tmp_path / "post_hoc", tmp_path / "inline"
    assert union_merge(zoo, merged, "pad", "angle") == 0
    assert performAIM.main(["--merged_model", str(merged), "--pretrained_model_name",
                            str(zoo["base"]), "--omega", "0.4", "--save_path", str(post_hoc),
                            *stats]) == 0
    assert merge.main(["--method", "task_arithmetic", "--base_model", str(zoo["base"]),
                       "--models_to_merge", f"{zoo['pad']},{zoo['angle']}", "--save_path",
                       str(inline), "--vocab", "union", "--aim", "--omega", "0.4", *stats]) == 0
    got, want = load_weights(inline), load_weights(post_hoc)
    assert got[HEAD].shape[0] == load_weights(zoo["base"])[HEAD].shape[0] + 2
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got[HEAD], load_weights(merged)[HEAD])   # the head was relaxed
