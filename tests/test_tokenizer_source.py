"""merge.py --config with `tokenizer_source: union | <model>` (mergekit 0.1.5's vocabulary,
ALGORITHMS.md §18.8): the fill rules on hand-made vocabularies, and merges of tiny models whose
tokenizers add different tokens, worked by hand. (bench/vocab_vs_mergekit.py compares with
mergekit itself.)"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import merge
from merging_methods.token_vocab import MEAN, OWN, ZERO, TokenRows, align_rows, fill_sources
from tests.test_merge_cli import assert_user_error, load_weights
from tests.tiny_models import build_finetune, build_llama

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"

# models [base, a, b] x tokens t0..t4: t0 everyone, t1 base and a, t2 a and b, t3 only b, t4 nobody
INDEX = torch.tensor([[0, 1, -1, -1, -1],
                      [1, 0, 2, -1, -1],
                      [0, -1, 1, 2, -1]])


def test_fill_rules_in_mergekit_order():
    """Only holder, then nobody (zeros), then the base's row, else the holders' mean."""
    assert fill_sources(INDEX, base=0).tolist() == [OWN, 0, MEAN, 2, ZERO]
    assert fill_sources(INDEX, base=None).tolist() == [OWN, MEAN, MEAN, 2, ZERO]


def test_rows_are_reindexed_by_token_and_filled():
    base = torch.tensor([[10.0], [11.0]])
    a = torch.tensor([[20.0], [21.0], [22.0]])
    b = torch.tensor([[30.0], [31.0], [32.0]])
    out = align_rows([base, a, b], INDEX, fill_sources(INDEX, base=0), rows=5)
    # t0 own rows; t1 base's row 11 for b; t2 mean (22 + 31) / 2 = 26.5 for the base;
    # t3 b's row 32 for all who lack it; t4 zeros
    assert [r.flatten().tolist() for r in out] == [[10, 11, 26.5, 32, 0],
                                                   [21, 20, 22, 32, 0],
                                                   [30, 11, 31, 32, 0]]


def test_the_fill_rules_see_only_the_tensors_inputs():
    """A tensor read from base and a only: t2 has one holder there (a), t3 none (zeros)."""
    plan = TokenRows(None, 5, ("base", "a", "b"), INDEX, "base", {})
    base, a = torch.tensor([[10.0], [11.0]]), torch.tensor([[20.0], [21.0], [22.0]])
    out = plan.align([a, base], ["a", "base"])
    assert [r.flatten().tolist() for r in out] == [[21, 20, 22, 0, 0], [10, 11, 22, 0, 0]]


def test_named_rows_fill_lacking_models_or_everyone_when_forced():
    """t1 from a's row 2 (b lacks t1, base has it): only b takes it; t3 forced zeros: all do."""
    base = torch.tensor([[10.0], [11.0]])
    a = torch.tensor([[20.0], [21.0], [22.0]])
    b = torch.tensor([[30.0], [31.0], [32.0]])
    fill, fill_row = fill_sources(INDEX, base=0), INDEX[0].clone()
    fill[1], fill_row[1] = 1, 2
    fill[3] = ZERO
    force = torch.tensor([False, False, False, True, False])
    out = align_rows([base, a, b], INDEX, fill, 5, fill_row, force)
    assert [r.flatten().tolist() for r in out] == [[10, 11, 26.5, 0, 0],
                                                   [21, 20, 22, 0, 0],
                                                   [30, 22, 31, 0, 0]]


def test_padding_rows_are_each_models_mean_row():
    index = torch.tensor([[0, 1], [1, 0]])
    out = align_rows([torch.tensor([[1.0], [3.0]]), torch.tensor([[5.0], [9.0]])], index,
                     fill_sources(index, base=0), rows=4)
    assert [r.flatten().tolist() for r in out] == [[1, 3, 2, 2], [9, 5, 7, 7]]


def test_a_mean_is_summed_in_the_inputs_dtype_like_mergekit():
    """bf16: 1 + 2^-8 + 2^-8 rounds to 1 at each step, so the mean is bf16(1/3) = 0.333984375;
    a float32 sum would give bf16(1.0078125 / 3) = 0.3359375."""
    index = torch.tensor([[-1], [0], [0], [0]])
    rows = [torch.zeros(1, 1, dtype=torch.bfloat16),
            *(torch.tensor([[v]], dtype=torch.bfloat16) for v in (1.0, 2 ** -8, 2 ** -8))]
    out = align_rows(rows, index, fill_sources(index, base=0), rows=1)
    assert out[0].item() == 0.333984375 and out[0].dtype == torch.bfloat16


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and fine-tunes adding [PAD], or <pad> and <|im_end|>, to its tokenizer."""
    root = tmp_path_factory.mktemp("tokenizer_source")
    base = build_llama(root / "base", seed=0)
    return dict(base=base,
                pad=build_finetune(base, root / "pad", seed=1, added_tokens=("[PAD]",)),
                two=build_finetune(base, root / "two", seed=2,
                                   added_tokens=("<pad>", "<|im_end|>")))


def run_config(tmp_path, zoo, tail: str, name: str = "out") -> tuple[int, object]:
    config = tmp_path / f"{name}.yml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n"
                      f"  - model: {zoo['pad']}\n    parameters: {{weight: 0.7}}\n"
                      f"  - model: {zoo['two']}\n    parameters: {{weight: 0.5}}\n{tail}")
    out = tmp_path / name
    return merge.main(["--config", str(config), "--save_path", str(out)]), out


def test_union_vocabulary(zoo, tmp_path):
    """Base tokens, then [PAD] (pad's), then <pad> and <|im_end|> (two's). A token one model
    alone has takes that model's row in every model, so its merged row is that row itself."""
    code, out = run_config(tmp_path, zoo, "tokenizer_source: union\n")
    assert code == 0
    b, p, t = (load_weights(zoo[k]) for k in ("base", "pad", "two"))
    got = load_weights(out)
    v0 = b[EMBED].shape[0]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["[PAD]", "<pad>", "<|im_end|>"]) == [v0, v0 + 1, v0 + 2]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == v0 + 3
    for name in (EMBED, HEAD):
        shared = b[name] + 0.7 * (p[name][:v0] - b[name]) + 0.5 * (t[name][:v0] - b[name])
        torch.testing.assert_close(got[name][:v0], shared, rtol=1e-6, atol=1e-7)
        assert torch.equal(got[name][v0], p[name][v0])
        assert torch.equal(got[name][v0 + 1:], t[name][v0:v0 + 2])
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("<|im_end|> The quick brown fox [PAD]", return_tensors="pt").input_ids
    assert ids[0, 0] == v0 + 2 and ids[0, -1] == v0
    assert torch.isfinite(model(ids).logits).all()
    again = tmp_path / "again"
    assert merge.main(["--config", str(out / "merge_recipe.yaml"), "--save_path", str(again)]) == 0
    assert all(torch.equal(load_weights(again)[k], got[k]) for k in got)
    assert yaml.safe_load((out / "merge_recipe.yaml").read_text())["tokenizer_source"] == "union"


def test_a_model_as_the_source_padded(zoo, tmp_path):
    """two's tokenizer: pad's [PAD] row is dropped; two's tokens take two's rows; 302 tokens
    padded to 320 rows, each model's padding its mean re-indexed row."""
    code, out = run_config(tmp_path, zoo, f"tokenizer: {{source: {zoo['two']}, "
                                          "pad_to_multiple_of: 64}\n")
    assert code == 0
    b, p, t = (load_weights(zoo[k]) for k in ("base", "pad", "two"))
    got = load_weights(out)
    v0 = b[EMBED].shape[0]
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(
        zoo["two"]).get_vocab()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 320
    for name in (EMBED, HEAD):
        assert got[name].shape[0] == 320 and torch.equal(got[name][v0:v0 + 2], t[name][v0:])
        rows = [torch.cat([m[name][:v0], t[name][v0:]]) for m in (b, p, t)]
        means = [r.mean(0) for r in rows]
        want = means[0] + 0.7 * (means[1] - means[0]) + 0.5 * (means[2] - means[0])
        torch.testing.assert_close(got[name][v0 + 2:], want.expand(320 - v0 - 2, -1),
                                   rtol=1e-5, atol=1e-6)


def test_per_token_sources(zoo, tmp_path):
    """tokens: a new token from pad's [PAD] row, <pad> forced to zeros, <|im_end|> forced to
    the base's row 5; every model gets the same row, so the merge is that row."""
    tokens = ("tokenizer:\n  source: union\n  tokens:\n"
              f"    '<|im_start|>': {{source: {{kind: model_token, model: {zoo['pad']}, "
              "token: '[PAD]'}}\n"
              "    '<pad>': {source: {kind: zero}, force: true}\n"
              f"    '<|im_end|>': {{source: {{kind: model_token, model: {zoo['base']}, "
              "token_id: 5}, force: true}\n")
    code, out = run_config(tmp_path, zoo, tokens)
    assert code == 0
    b, p = load_weights(zoo["base"]), load_weights(zoo["pad"])
    got = load_weights(out)
    v0 = b[EMBED].shape[0]
    ids = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(
        ["<pad>", "<|im_end|>", "<|im_start|>"])
    assert ids == [v0 + 1, v0 + 2, v0 + 3]
    for name in (EMBED, HEAD):
        assert got[name].shape[0] == v0 + 4
        assert not got[name][v0 + 1].any()
        assert torch.equal(got[name][v0 + 2], b[name][5])
        assert torch.equal(got[name][v0 + 3], p[name][v0])
    record = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert record["tokenizer"]["tokens"]["<pad>"] == {"source": {"kind": "zero"}, "force": True}


@pytest.mark.parametrize("entry, message", [
    ("'<x>': {source: nobody/model}", "tokenizer.tokens.<x>: nobody/model is not one of the"),
    ("'<x>': {source: BASE}", "tokenizer.tokens.<x>: BASE has no row for '<x>'; name one"),
    ("'<x>': {source: {kind: model_token, model: BASE, token: '<nope>'}}",
     "tokenizer.tokens.<x>: BASE has no row for token '<nope>'"),
])
def test_per_token_sources_that_name_no_row_are_refused(zoo, tmp_path, capsys, entry, message):
    entry = entry.replace("BASE", str(zoo["base"]))
    code, out = run_config(tmp_path, zoo, f"tokenizer:\n  tokens:\n    {entry}\n")
    assert_user_error(capsys, code, message.replace("BASE", str(zoo["base"])))
    assert not out.exists()


def test_base_source_by_token_has_the_tokenizers_rows(zoo, tmp_path):
    """A base with 3 rows its tokenizer does not name (like Qwen2.5): `tokenizer_source: base`
    keeps them (--vocab base), the by-token form cuts them as mergekit does."""
    wide = build_llama(tmp_path / "wide", seed=0, vocab_size=len(AutoTokenizer.from_pretrained(
        zoo["base"])) + 3, tokenizer_from=zoo["base"])
    v0 = len(AutoTokenizer.from_pretrained(wide))
    rows = {}
    for name, tail in (("kept", "tokenizer_source: base\n"),
                       ("cut", "tokenizer: {source: base, pad_to_multiple_of: 1}\n")):
        code, out = run_config(tmp_path, {**zoo, "base": wide}, tail, name)
        assert code == 0
        rows[name] = load_weights(out)[EMBED].shape[0]
        assert json.loads((out / "config.json").read_text())["vocab_size"] == rows[name]
    assert rows == {"kept": v0 + 3, "cut": v0}


def test_a_token_past_a_models_rows_counts_as_lacking(zoo, tmp_path):
    """short names <extra> at an id it has no row for (mergekit 0.1.5 stops with a KeyError once
    another model brings <extra> into the union); here short lacks it, so it takes the only
    holder's row and the merged row is that row."""
    from safetensors.torch import save_file

    short = build_finetune(zoo["base"], tmp_path / "short", seed=5,
                           added_tokens=("[PAD]", "<extra>"))
    weights = load_weights(short)
    for name in (EMBED, HEAD):
        weights[name] = weights[name][:-1].contiguous()
    save_file(weights, short / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "vocab_size": len(weights[EMBED])}))
    holder = build_finetune(zoo["base"], tmp_path / "holder", seed=6, added_tokens=("<extra>",))
    code, out = run_config(tmp_path, {**zoo, "pad": short, "two": holder},
                           "tokenizer_source: union\n")
    assert code == 0
    v0 = load_weights(zoo["base"])[EMBED].shape[0]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["[PAD]", "<extra>"]) == [v0, v0 + 1]
    got, held = load_weights(out), load_weights(holder)
    assert all(torch.equal(got[n][v0 + 1], held[n][v0]) for n in (EMBED, HEAD))


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>' }}{% endfor %}")


def test_chat_template_auto_and_literal(zoo, tmp_path):
    """auto: the template most models have (2 of 3 here, the donor's differs), also into a
    union tokenizer; a literal template replaces the donor's copied one."""
    templated = {}
    for name, template in (("base", "{{ 'base template' }} {{ messages }}"), ("pad", CHATML),
                           ("two", CHATML)):
        shutil.copytree(zoo[name], tmp_path / name)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / name)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp_path / name)
        templated[name] = tmp_path / name
    code, out = run_config(tmp_path, templated, "tokenizer_source: union\nchat_template: auto\n")
    assert code == 0 and AutoTokenizer.from_pretrained(out).chat_template == CHATML
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    code, out = run_config(tmp_path, templated, f"chat_template: \"{literal}\"\n", "literal")
    assert code == 0 and AutoTokenizer.from_pretrained(out).chat_template == literal


def test_inline_aim_relaxes_toward_the_reindexed_base(zoo, tmp_path):
    """[PAD], which only pad has, is pad's row in the base too: no delta, so AIM keeps it (a
    base grown by position, with a mean row there, would pull it away)."""
    from tests.test_aim_cli import CALIB

    config = tmp_path / "aim.yml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n"
                      f"  - model: {zoo['pad']}\n    parameters: {{weight: 0.7}}\n"
                      "tokenizer_source: union\n")
    plain, relaxed = tmp_path / "plain", tmp_path / "relaxed"
    assert merge.main(["--config", str(config), "--save_path", str(plain)]) == 0
    assert merge.main(["--config", str(config), "--save_path", str(relaxed), "--aim", "--omega",
                       "0.4", "--calib_data", "builtin", *CALIB]) == 0
    got, before = load_weights(relaxed), load_weights(plain)
    v0 = load_weights(zoo["base"])[HEAD].shape[0]
    assert torch.equal(got[HEAD][v0], load_weights(zoo["pad"])[HEAD][v0])
    assert not torch.equal(got[HEAD][:v0], before[HEAD][:v0])   # the other rows were relaxed


def test_post_hoc_aim_refuses_a_vocabulary_built_from_tokenizers(zoo, tmp_path, capsys):
    """Its rows are re-indexed by token; performAIM lines the base's up by position."""
    import performAIM

    code, out = run_config(tmp_path, zoo, "tokenizer_source: union\n")
    assert code == 0
    code = performAIM.main(["--merged_model", str(out), "--pretrained_model_name",
                            str(zoo["base"]), "--save_path", str(tmp_path / "aim")])
    assert_user_error(capsys, code, "was merged with a vocabulary built from tokenizers",
                      "merge.py --config ... --aim")


def test_passthrough_refuses_a_tokenizer_vocabulary(zoo, tmp_path, capsys):
    config = tmp_path / "p.yml"
    config.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n"
                      f"      - {{model: {zoo['pad']}, layer_range: [0, 2]}}\n"
                      "tokenizer_source: union\n")
    code = merge.main(["--config", str(config), "--save_path", str(tmp_path / "o")])
    assert_user_error(capsys, code, "tokenizer_source: passthrough copies layers as they are")


def sliced_config(tmp_path, zoo, second: str) -> object:
    """Two one-layer slices of task arithmetic over the base and `pad`, then `second`, with a
    union vocabulary."""
    config = tmp_path / "s.yml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\nslices:\n" + "".join(
            f"  - sources:\n      - {{model: {zoo['base']}, layer_range: [{i}, {i + 1}]}}\n"
            f"      - {{model: {zoo[m]}, layer_range: [{i}, {i + 1}], parameters: {{weight: 0.7}}}}\n"
            for i, m in enumerate(("pad", second))) + "tokenizer_source: union\n")
    return config


def test_sliced_union_vocabulary_equals_the_models_form(zoo, tmp_path):
    """Every slice lists the same models: the union vocabulary is each model's own, as with
    `models:`."""
    code = merge.main(["--config", str(sliced_config(tmp_path, zoo, "pad")), "--save_path",
                       str(tmp_path / "sliced")])
    assert code == 0
    config = tmp_path / "m.yml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n"
                      f"  - model: {zoo['pad']}\n    parameters: {{weight: 0.7}}\n"
                      "tokenizer_source: union\n")
    assert merge.main(["--config", str(config), "--save_path", str(tmp_path / "whole")]) == 0
    sliced, whole = load_weights(tmp_path / "sliced"), load_weights(tmp_path / "whole")
    assert sliced.keys() == whole.keys()
    assert all(torch.equal(sliced[k], whole[k]) for k in whole)


def test_sliced_union_vocabulary_over_other_models_per_slice_is_refused(zoo, tmp_path, capsys):
    code = merge.main(["--config", str(sliced_config(tmp_path, zoo, "two")), "--save_path",
                       str(tmp_path / "o")])
    assert_user_error(capsys, code, "needs every slice to list the same models in the same order")
    assert not (tmp_path / "o").exists()
