"""merge.py --config: mergekit YAML configs run end to end on tiny checkpoints, parameters
resolved per tensor (gradients, filters), slices for passthrough, and every output's
merge_recipe.yaml is itself a config that reproduces it bit for bit."""
from __future__ import annotations

import pytest
import torch
import yaml

import merge
from merging_methods.primitives import mask_key
from merging_methods.registry import METHODS
from tests.method_cases import case
from tests.test_merge_cli import assert_user_error, load_weights
from tests.tiny_models import build_finetune, build_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base (fp32, sharded) and three fine-tunes (one bf16)."""
    root = tmp_path_factory.mktemp("config")
    base = build_llama(root / "base", seed=0, max_shard_size="40KB")
    fts = [build_finetune(base, root / f"ft{i}", seed=i, scale=0.2,
                          dtype=torch.bfloat16 if i == 2 else None) for i in (1, 2, 3)]
    return base, fts


def run(*args) -> int:
    return merge.main([str(a) for a in args])


def same(a, b) -> bool:
    wa, wb = load_weights(a), load_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_recipe_file_reproduces_the_merge(models, tmp_path, method):
    base, fts = models
    if METHODS[method].stacks_layers:
        chosen, flags = fts[:2], ["--layer_ranges", "1:2,0:2", "--scale", "0.5,1"]
    else:
        chosen, flags, _ = case(method, fts)
    first, again = tmp_path / "first", tmp_path / "again"
    assert run("--method", method, "--base_model", base, "--models_to_merge",
               ",".join(map(str, chosen)), "--save_path", first, "--seed", 5, *flags) == 0
    assert run("--config", first / "merge_recipe.yaml", "--save_path", again) == 0
    assert same(first, again)
    record = yaml.safe_load((again / "merge_recipe.yaml").read_text())
    assert record["merge_method"] == method and record["merge"]["method"] == method


def test_a_dtype_alias_is_recorded_by_its_full_name(models, tmp_path):
    """--dtype bf16 is written as out_dtype: bfloat16 (mergekit's name; it refuses 'bf16'), so
    the recipe file runs again."""
    base, fts = models
    first, again = tmp_path / "first", tmp_path / "again"
    assert run("--method", "task_arithmetic", "--base_model", base, "--models_to_merge", fts[0],
               "--save_path", first, "--dtype", "bf16") == 0
    assert yaml.safe_load((first / "merge_recipe.yaml").read_text())["out_dtype"] == "bfloat16"
    assert run("--config", first / "merge_recipe.yaml", "--save_path", again) == 0
    assert same(first, again)


def write(tmp_path, text: str):
    path = tmp_path / "merge.yml"
    path.write_text(text)
    return path


def models_config(method: str, base, models: dict, tail: str = "") -> str:
    """A `models:` config: {model folder: its parameters as a YAML flow mapping}."""
    entries = "".join(f"  - model: {m}\n    parameters: {p}\n" for m, p in models.items())
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{entries}{tail}"


def test_a_mergekit_config_with_gradients_and_filters(models, tmp_path):
    base, (ft1, ft2, _) = models
    config = write(tmp_path, models_config("ties", base, {
        ft1: "{weight: [1.0, 0.5], density: [{filter: mlp, value: 0.5}, {value: 1.0}]}",
        ft2: "{weight: 0.7, density: 0.8}"},
        "parameters: {normalize: true}\ndtype: bfloat16\ntokenizer_source: base\n"))
    out = tmp_path / "out"
    assert run("--config", config, "--save_path", out) == 0
    got, b = load_weights(out), load_weights(base)
    others = [load_weights(ft1), load_weights(ft2)]
    spec = METHODS["ties"]

    def want(name, weights, density):
        params = spec.resolve({"weights": weights, "density": density, "normalize": True}, 2)
        return spec.fn(b[name].float(), [o[name].float() for o in others], **params)

    layer1_mlp = "model.layers.1.mlp.up_proj.weight"     # x = 1: the gradient's last value
    assert torch.equal(got[layer1_mlp], want(layer1_mlp, [0.5, 0.7], [0.5, 0.8]).bfloat16())
    attn0 = "model.layers.0.self_attn.q_proj.weight"      # x = 0, no mlp filter match
    assert torch.equal(got[attn0], want(attn0, [1.0, 0.7], [1.0, 0.8]).bfloat16())
    head = "lm_head.weight"                                # post-layer: x = 0
    assert torch.equal(got[head], want(head, [1.0, 0.7], [1.0, 0.8]).bfloat16())
    again = tmp_path / "again"
    assert run("--config", out / "merge_recipe.yaml", "--save_path", again) == 0
    assert same(out, again)


def test_seeded_dare_from_yaml_uses_l1_rescale_and_the_seed(models, tmp_path):
    base, (ft1, ft2, _) = models
    config = write(tmp_path, models_config("dare_ties", base, {
        ft1: "{weight: 0.6, density: 0.5}", ft2: "{weight: 0.4, density: 0.5}"}, "seed: 11\n"))
    out = tmp_path / "out"
    assert run("--config", config, "--save_path", out) == 0
    name = "model.layers.1.mlp.down_proj.weight"
    b, others = load_weights(base), [load_weights(ft1), load_weights(ft2)]
    spec = METHODS["dare_ties"]
    params = spec.resolve({"weights": [0.6, 0.4], "density": 0.5, "rescale_mode": "l1"}, 2)
    want = spec.fn(b[name].float(), [o[name].float() for o in others], **params,
                   mask_keys=[mask_key(11, i, name) for i in range(2)])
    assert torch.equal(load_weights(out)[name], want)


def test_passthrough_slices_with_a_filtered_scale(models, tmp_path):
    from transformers import AutoModelForCausalLM

    base, (ft1, _, _) = models
    config = write(tmp_path, f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {base}, layer_range: [0, 2]}}]
  - sources: [{{model: {ft1}, layer_range: [1, 2]}}]
    parameters:
      scale: [{{filter: down_proj, value: 0.5}}, {{value: 1.0}}]
""")
    out = tmp_path / "out"
    assert run("--config", config, "--save_path", out) == 0
    got, b, f = load_weights(out), load_weights(base), load_weights(ft1)
    down, up = "model.layers.{}.mlp.down_proj.weight", "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(got[down.format(1)], b[down.format(1)])
    assert torch.equal(got[down.format(2)], f[down.format(1)] * 0.5)
    assert torch.equal(got[up.format(2)], f[up.format(1)])
    assert torch.equal(got["lm_head.weight"], f["lm_head.weight"])   # the last slice's model
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def layer(k: int, rest: str) -> str:
    return f"model.layers.{k}.{rest}"


def test_slerp_slices_merge_each_output_layer_from_its_source_layers(models, tmp_path):
    """§18.6: output layer off+j = slerp of layer a_k+j of each source; embeddings from
    slices[0]'s sources, norm and lm_head from slices[-1]'s; x restarts per slice; a slice's
    shared `t` wins over the top-level one (§18.5)."""
    from transformers import AutoModelForCausalLM

    base, (ft1, ft2, _) = models
    config = write(tmp_path, f"""\
slices:
  - sources: [{{model: {base}, layer_range: [0, 2]}}, {{model: {ft1}, layer_range: [0, 2]}}]
  - sources: [{{model: {base}, layer_range: [1, 2]}}, {{model: {ft2}, layer_range: [0, 1]}}]
    parameters: {{t: 0.9}}
merge_method: slerp
base_model: {base}
parameters:
  t: [{{filter: self_attn, value: [0.2, 0.8]}}, {{value: 0.5}}]
""")
    out = tmp_path / "out"
    assert run("--config", config, "--save_path", out) == 0
    got, b, f1, f2 = (load_weights(p) for p in (out, base, ft1, ft2))
    slerp = METHODS["slerp"].fn
    q, up = "self_attn.q_proj.weight", "mlp.up_proj.weight"
    emb, norm, head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
    expected = {   # output name: (base's source name, other model, its source name, t)
        emb: (emb, f1, emb, 0.5),
        layer(0, q): (layer(0, q), f1, layer(0, q), 0.2),    # x = 0 in slice 0
        layer(1, q): (layer(1, q), f1, layer(1, q), 0.8),    # x = 1
        layer(1, up): (layer(1, up), f1, layer(1, up), 0.5),  # no self_attn: catch-all
        layer(2, q): (layer(1, q), f2, layer(0, q), 0.9),    # slice 1: its own t
        layer(2, up): (layer(1, up), f2, layer(0, up), 0.9),
        norm: (norm, f2, norm, 0.9), head: (head, f2, head, 0.9),   # slices[-1]'s models
    }
    for name, (source, other, other_source, t) in expected.items():
        want = slerp(b[source].float(), [other[other_source].float()], t=t)
        # rounding only: slerp's dot and norms are float32 sums, whose order can follow the
        # data's memory alignment; a wrong source or t is off by > 1e-3
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    again = tmp_path / "again"
    assert run("--config", out / "merge_recipe.yaml", "--save_path", again) == 0
    assert same(out, again)


def test_ties_slices_with_a_slice_base_and_filters_on_source_names(models, tmp_path):
    """A slice's base_model (not its first source) is that slice's base; per-model filters
    match the source tensor name (`layers.1.` picks output layer 2, read from source layer 1),
    shared ones (`lambda`) the output name; the slice's `normalize` wins over the default."""
    base, (ft1, ft2, ft3) = models
    by_layer_1 = "[{filter: layers.1., value: 0.3}, {value: 0.7}]"
    config = write(tmp_path, f"""\
merge_method: ties
base_model: {base}
slices:
  - sources:
      - {{model: {ft1}, layer_range: [0, 2], parameters: {{weight: 0.5, density: {by_layer_1}}}}}
      - {{model: {base}, layer_range: [0, 2]}}
      - {{model: {ft3}, layer_range: [0, 2], parameters: {{weight: 0.5}}}}
  - sources:
      - {{model: {ft3}, layer_range: [1, 2], parameters: {{weight: 0.8, density: {by_layer_1}}}}}
      - {{model: {ft1}, layer_range: [0, 1], parameters: {{weight: 0.4}}}}
      - {{model: {ft2}, layer_range: [1, 2]}}
    base_model: {ft2}
    parameters: {{normalize: false}}
parameters: {{density: 0.6, lambda: [{{filter: layers.2., value: 0.5}}, {{value: 1.0}}]}}
""")
    out = tmp_path / "out"
    assert run("--config", config, "--save_path", out) == 0
    got, b, f1, f2, f3 = (load_weights(p) for p in (out, base, ft1, ft2, ft3))
    spec = METHODS["ties"]
    up, emb, head = "mlp.up_proj.weight", "model.embed_tokens.weight", "lm_head.weight"
    expected = {   # output name: (base, others as (model, source name), weights, densities,
        #            normalize, lambda)
        emb: ((b, emb), [(f1, emb), (f3, emb)], [0.5, 0.5], [0.7, 0.6], True, 1.0),
        layer(1, up): ((b, layer(1, up)), [(f1, layer(1, up)), (f3, layer(1, up))],
                       [0.5, 0.5], [0.3, 0.6], True, 1.0),
        layer(2, up): ((f2, layer(1, up)), [(f3, layer(1, up)), (f1, layer(0, up))],
                       [0.8, 0.4], [0.3, 0.6], False, 0.5),
        head: ((f2, head), [(f3, head), (f1, head)], [0.8, 0.4], [0.7, 0.6], False, 1.0),
    }
    for name, ((bm, bs), others, weights, density, normalize, scaling) in expected.items():
        params = spec.resolve({"weights": weights, "density": density, "normalize": normalize,
                               "scaling": scaling}, 2)
        want = spec.fn(bm[bs].float(), [m[n].float() for m, n in others], **params)
        assert torch.equal(got[name], want), name


def test_yaml_ties_trims_like_mergekit(models, tmp_path):
    """§19.3 in YAML mode: k = max(1, floor(density*n)) (density 0.01 keeps the one largest
    |delta| of a 32-entry norm, 10 of a 32x32 matrix), and density 0 zeroes a task vector."""
    base, (ft1, _, ft3) = models
    config = write(tmp_path, models_config("ties", base, {
        ft1: "{weight: 1.0, density: 0.01}", ft3: "{weight: 0.5, density: 0}"}))
    out = tmp_path / "out"
    assert run("--config", config, "--save_path", out) == 0
    got, b, f1 = load_weights(out), load_weights(base), load_weights(ft1)
    for name, k in (("model.norm.weight", 1), (layer(0, "self_attn.q_proj.weight"), 10)):
        delta = f1[name] - b[name]
        keep = torch.zeros(delta.numel(), dtype=torch.bool)
        keep[delta.abs().flatten().topk(k).indices] = True
        assert torch.equal(got[name], torch.where(keep.view_as(delta), b[name] + delta, b[name]))


@pytest.mark.parametrize("extra, text, fragment", [
    (["--density", "0.5"], "merge_method: ties", "--density cannot be combined with --config"),
    (["--method", "ties"], "merge_method: ties", "--method cannot be combined with --config"),
    ([], "merge_method: ties\nbase_model: {base}\nparameters: {{weight: 1}}\nslices:\n"
         "  - sources: [{{model: {base}, layer_range: [0, 1]}}, {{model: {ft}, layer_range: [0, 1]}}]\n"
         "  - sources: [{{model: {base}, layer_range: [1, 2]}}, {{model: {ft}, layer_range: [1, 2]}}, "
         "{{model: {ft2}, layer_range: [1, 2]}}]\n",
     "slices[1]: 3 sources, slices[0] has 2; merge.py merges the same number of models"),
    (["--aim"], "merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nslices:\n"
                "  - sources: [{{model: {base}, layer_range: [1, 2]}}, {{model: {ft}, layer_range: [0, 1]}}]\n",
     "--aim: the slices move the base's layers"),
    ([], "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {ft}}}]\n",
     "missing required parameter 'weight'"),
    ([], "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {ft}}}]\nparameters: {{t: 0.5}}\n"
         "desnity: 3\n", "unknown key 'desnity'"),
])
def test_config_refusals_are_one_line(models, tmp_path, capsys, extra, text, fragment):
    base, fts = models
    body = text.format(base=base, ft=fts[0], ft2=fts[1])
    if "models" not in body and "slices" not in body:
        body += f"\nbase_model: {base}\nmodels: [{{model: {fts[0]}, parameters: {{weight: 1}}}}]\n"
    code = run("--config", write(tmp_path, body), "--save_path", tmp_path / "o", *extra)
    assert_user_error(capsys, code, fragment)
    assert not (tmp_path / "o").exists()


def test_method_flags_are_required_without_config(models, tmp_path, capsys):
    base, _ = models
    code = run("--base_model", base, "--save_path", tmp_path / "o")
    assert_user_error(capsys, code, "--method, --models_to_merge: required (or give a mergekit")


def test_slices_give_the_heads_the_donor_declares(models, tmp_path):
    """The output's config.json is the base's (untied head); when the last slice's base ties its
    head, the output's lm_head is merged from that model's input embedding instead of being
    left out (transformers would then initialise it at random)."""
    base, (ft1, _, _) = models
    tied = build_llama(tmp_path / "tied", seed=7, tie=True)
    config = write(tmp_path, (
        f"merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{weight: 0.5}}\n"
        "slices:\n"
        f"  - sources: [{{model: {base}, layer_range: [0, 1]}}, {{model: {ft1}, layer_range: [0, 1]}}]\n"
        f"  - base_model: {tied}\n"
        f"    sources: [{{model: {tied}, layer_range: [1, 2]}}, {{model: {ft1}, layer_range: [1, 2]}}]\n"))
    out = tmp_path / "out"
    assert run("--config", config, "--save_path", out) == 0
    got, t, f = load_weights(out), load_weights(tied), load_weights(ft1)
    embedding = t["model.embed_tokens.weight"]
    assert "lm_head.weight" not in t
    assert torch.equal(got["lm_head.weight"], embedding + 0.5 * (f["lm_head.weight"] - embedding))
