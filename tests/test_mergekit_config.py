"""mergekit YAML configs (ALGORITHMS.md §18): the worked examples of §18.10 resolve to the values
stated there; gradients, filters, scopes, slices; every bad key is refused with one line."""
from __future__ import annotations

import pytest

from checkpoints.errors import UserError
from merging_methods.mergekit_config import (Gradient, ModelRef, Rule, TokenSource, load_config,
                                             to_yaml)
from merging_methods.mergekit_plan import (POST, PRE, donor, gradient_value, method_params,
                                           plan_merge, referenced_models, resolve, setting_value)

EXAMPLE_A = """
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
models:
  - model: mistralai/Mistral-7B-v0.1          # base listed without parameters: fine
  - model: teknium/OpenHermes-2.5-Mistral-7B
    parameters:
      weight: 0.6
      density:                                # no catch-all entry on purpose
        - filter: self_attn
          value: 0.7
        - filter: mlp
          value: 0.4
  - model: meta-math/MetaMath-Mistral-7B
    parameters:
      weight: 0.4
      density: [0.2, 0.8]                     # gradient over depth
parameters:
  density: 0.5                                # used where OpenHermes' filters match nothing
  normalize: true
  int8_mask: true
dtype: bfloat16
"""
EXAMPLE_B = """
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""
EXAMPLE_C = """
slices:
  - sources:
      - model: mistralai/Mistral-7B-Instruct-v0.2
        layer_range: [0, 24]
  - sources:
      - model: HuggingFaceH4/zephyr-7b-beta
        layer_range: [8, 32]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - filter: down_proj
              value: 0.5
            - value: 1.0
merge_method: passthrough
dtype: bfloat16
"""
EXAMPLE_D = """
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: HuggingFaceH4/zephyr-7b-beta
    parameters: {weight: 0.5, density: 0.6}
  - model: teknium/OpenHermes-2.5-Mistral-7B
    parameters:
      weight:
        - filter: mlp
          value: 0.4
        - value: 0.25
      density: 0.5
  - model: meta-math/MetaMath-Mistral-7B
    parameters:
      weight: [0.1, 0.3]                      # density comes from the global scope
parameters:
  density: 0.4
  lambda: 1.1
  int8_mask: true
dtype: bfloat16
out_dtype: bfloat16
"""
EXAMPLES = [EXAMPLE_A, EXAMPLE_B, EXAMPLE_C, EXAMPLE_D]
BASE = ModelRef("mistralai/Mistral-7B-v0.1")


def plan_of(text: str, depth: int = 32):
    config = load_config(text)
    return plan_merge(config, {m: depth for m in referenced_models(config)})


def position(name: str):
    """The runner's job: the output layer index, or PRE/POST for the other tensors."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return PRE if "embed_tokens" in name else POST


def at(plan, name: str):
    return resolve(plan, name, position(name))


def per_model(merge, *keys: str) -> list[tuple]:
    return [tuple(i.params.get(k) for k in keys) for i in merge.others]


# --- the worked examples of §18.10 ---------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("model.embed_tokens.weight", [(0.6, 0.5), (0.4, 0.2)]),
    ("model.layers.0.self_attn.q_proj.weight", [(0.6, 0.7), (0.4, 0.2)]),
    ("model.layers.15.mlp.gate_proj.weight", [(0.6, 0.4), (0.4, 0.490323)]),
    ("model.layers.31.input_layernorm.weight", [(0.6, 0.5), (0.4, 0.8)]),
    ("model.layers.31.self_attn.v_proj.weight", [(0.6, 0.7), (0.4, 0.8)]),
    ("lm_head.weight", [(0.6, 0.5), (0.4, 0.2)]),
])
def test_example_a_ties_per_filter_density(name, expected):
    merge = at(plan_of(EXAMPLE_A), name)
    assert merge.base.model == BASE and merge.base.params == {}
    assert [i.model.path for i in merge.others] == ["teknium/OpenHermes-2.5-Mistral-7B",
                                                    "meta-math/MetaMath-Mistral-7B"]
    assert per_model(merge, "weight", "density") == [pytest.approx(e, abs=1e-6) for e in expected]
    # (+ our mergekit_trim, on in YAML: mergekit's own trim rule, §19.3)
    assert merge.shared == {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": True,
                            "mergekit_trim": True}


@pytest.mark.parametrize("name, t", [
    ("model.embed_tokens.weight", 0.5),
    ("model.layers.0.self_attn.q_proj.weight", 0.0),
    ("model.layers.8.self_attn.o_proj.weight", 0.493548),
    ("model.layers.16.mlp.down_proj.weight", 0.674194),
    ("model.layers.20.post_attention_layernorm.weight", 0.5),
    ("model.layers.31.mlp.up_proj.weight", 0.0),
    ("model.norm.weight", 0.5),
    ("lm_head.weight", 0.5),
])
def test_example_b_slerp_t_gradients_by_filter(name, t):
    merge = at(plan_of(EXAMPLE_B), name)
    assert merge.shared == {"t": pytest.approx(t, abs=1e-6)}
    assert merge.base.model.path == "OpenPipe/mistral-ft-optimized-1218"
    assert [(i.model.path, i.tensor, i.params) for i in merge.others] == [
        ("mlabonne/NeuralHermes-2.5-Mistral-7B", name, {})]


@pytest.mark.parametrize("name, model, source, scale", [
    ("model.embed_tokens.weight", "mistralai/Mistral-7B-Instruct-v0.2",
     "model.embed_tokens.weight", None),
    ("model.layers.23.mlp.down_proj.weight", "mistralai/Mistral-7B-Instruct-v0.2",
     "model.layers.23.mlp.down_proj.weight", None),
    ("model.layers.24.self_attn.q_proj.weight", "HuggingFaceH4/zephyr-7b-beta",
     "model.layers.8.self_attn.q_proj.weight", 1.0),
    ("model.layers.24.self_attn.o_proj.weight", "HuggingFaceH4/zephyr-7b-beta",
     "model.layers.8.self_attn.o_proj.weight", 0.5),
    ("model.layers.47.mlp.down_proj.weight", "HuggingFaceH4/zephyr-7b-beta",
     "model.layers.31.mlp.down_proj.weight", 0.5),
    ("model.norm.weight", "HuggingFaceH4/zephyr-7b-beta", "model.norm.weight", 1.0),
    ("lm_head.weight", "HuggingFaceH4/zephyr-7b-beta", "lm_head.weight", 1.0),
])
def test_example_c_passthrough_frankenmerge(name, model, source, scale):
    plan = plan_of(EXAMPLE_C)
    assert plan.num_hidden_layers == 48
    merge = at(plan, name)
    assert merge.base is None and merge.shared == {}
    [only] = merge.others
    assert (only.model.path, only.tensor, only.params.get("scale")) == (model, source, scale)
    assert donor(plan.config).path == "mistralai/Mistral-7B-Instruct-v0.2"  # §18.7 Decision


@pytest.mark.parametrize("name, expected", [
    ("model.embed_tokens.weight", [(0.5, 0.6), (0.25, 0.5), (0.1, 0.4)]),
    ("model.layers.0.mlp.up_proj.weight", [(0.5, 0.6), (0.4, 0.5), (0.1, 0.4)]),
    ("model.layers.10.self_attn.k_proj.weight", [(0.5, 0.6), (0.25, 0.5), (0.164516, 0.4)]),
    ("model.layers.31.mlp.down_proj.weight", [(0.5, 0.6), (0.4, 0.5), (0.3, 0.4)]),
    ("lm_head.weight", [(0.5, 0.6), (0.25, 0.5), (0.1, 0.4)]),
])
def test_example_d_dare_ties_per_model_weights(name, expected):
    merge = at(plan_of(EXAMPLE_D), name)
    assert per_model(merge, "weight", "density") == [pytest.approx(e, abs=1e-6) for e in expected]
    assert merge.shared == {"normalize": False, "rescale": True, "lambda": 1.1, "int8_mask": True,
                            "rescale_mode": "l1"}   # our extension key, mergekit 0.1.5's rescale
    params = method_params(merge)  # our keywords: lists over the models, L1 rescale (§19.3)
    assert params["weights"] == [e[0] for e in per_model(merge, "weight")]
    assert params["scaling"] == 1.1 and params["rescale_mode"] == "l1"
    assert "weight" not in params and "lambda" not in params and "int8_mask" not in params


@pytest.mark.parametrize("text", EXAMPLES)
def test_to_yaml_round_trip(text):
    config = load_config(text)
    assert load_config(to_yaml(config)) == config
    assert to_yaml(load_config(to_yaml(config))) == to_yaml(config)


# --- gradients, filters, scalars (§18.3, §18.4) --------------------------------------------
@pytest.mark.parametrize("values, x, expected", [
    ((0.0, 0.5, 0.3, 0.7, 1.0), 8 / 31, 0.5 - 0.2 * (32 / 31 - 1)),  # s = 32/31
    ((0.2, 0.8), 15 / 31, 0.2 + 0.6 * 15 / 31),
    ((1.0, 3.0, 2.0), 0.5, 3.0),  # s = 1 exactly
    ((1.0, 3.0, 2.0), 0.75, 2.5),  # s = 1.5
    ((1.0, 3.0, 2.0), 1.0, 2.0),  # the last value at x = 1
    ((1.0, 3.0, 2.0), 0.0, 1.0),
    ((0.7,), 0.4, 0.7),  # one value: constant
])
def test_gradient_interpolation(values, x, expected):
    assert gradient_value(values, x) == pytest.approx(expected, abs=1e-12)


def test_boolean_gradients_are_picked_not_mixed():
    """Booleans take entry floor(x * (K - 1)) (§18.4's formula), never a blend."""
    assert [gradient_value((True, False), x) for x in (0.0, 0.5, 0.99, 1.0)] == [
        True, True, True, False]
    assert [gradient_value((True, False, True), x) for x in (0.49, 0.5, 0.99, 1.0)] == [
        True, False, False, True]


def test_filters_are_substrings_first_match_wins_none_falls_through():
    rules = (Rule("layers.1.", 1.0), Rule("*proj", 2.0), Rule("mlp", Gradient((0.0, 1.0))))
    assert setting_value(rules, "model.layers.1.mlp.up_proj.weight", 0.0) == 1.0
    assert setting_value(rules, "model.layers.10.mlp.up_proj.weight", 0.5) == 0.5  # no glob
    assert setting_value(rules, "model.layers.10.self_attn.q_proj.weight", 0.5) is None
    assert setting_value((Rule("*", 3.0),), "anything", 0.0) == 3.0
    assert setting_value((), "anything", 0.0) is None


@pytest.mark.parametrize("raw, value", [
    ("0.5", 0.5), ('"0.5"', 0.5), ('"1e-5"', 1e-5), ("1e-5", 1e-5), ("true", 1.0), ("2", 2.0)])
def test_float_scalars_accept_mergekit_spellings(raw, value):
    """PyYAML reads 1e-5 (no dot) as a string; mergekit's float check accepts it and true."""
    config = load_config(f"{GTA}parameters: {{weight: {raw}}}\n")
    assert config.parameters["weight"] == value and isinstance(config.parameters["weight"], float)


GTA = "merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: m\n"


def test_single_filter_mapping_is_a_one_entry_list():
    config = load_config(f"{GTA}parameters: {{weight: {{filter: mlp, value: 2}}}}\n")
    assert config.parameters["weight"] == (Rule("mlp", 2.0),)


# --- scopes and precedence (§18.5) ---------------------------------------------------------
SCOPES = """
merge_method: ties
base_model: base
slices:
  - sources:
      - model: base
        layer_range: [0, 4]
      - model: a
        layer_range: [0, 4]
        parameters: {density: [{filter: mlp, value: 0.9}]}
      - model: b
        layer_range: [4, 8]
    parameters:
      weight: [{filter: layers.5., value: 0.7}]
      normalize: [{filter: layers.1., value: false}]
  - sources:
      - model: base
        layer_range: [4, 8]
      - model: a
        layer_range: [4, 8]
      - model: b
        layer_range: [0, 4]
parameters:
  weight: 0.3
  density: [{filter: self_attn, value: 0.2}]
"""


def test_model_then_slice_then_top_level_then_default():
    plan = plan_of(SCOPES, depth=8)
    merge = resolve(plan, "model.layers.1.mlp.up_proj.weight", 1)
    # a: own density; slice weight matches no source name of a (layers.1.) -> top level 0.3.
    # b reads layer 5: the slice's weight filter matches b's *source* name.
    assert per_model(merge, "weight", "density") == [(0.3, 0.9), (0.7, 1.0)]
    assert [i.tensor for i in merge.others] == ["model.layers.1.mlp.up_proj.weight",
                                                "model.layers.5.mlp.up_proj.weight"]
    # shared filters see the output name: normalize false from the slice at output layer 1
    assert merge.shared["normalize"] is False
    other = resolve(plan, "model.layers.5.self_attn.q_proj.weight", 5)  # second slice
    assert per_model(other, "weight", "density") == [(0.3, 0.2), (0.3, 0.2)]
    assert other.shared["normalize"] is True  # the ties default
    assert [i.tensor for i in other.others] == ["model.layers.5.self_attn.q_proj.weight",
                                                "model.layers.1.self_attn.q_proj.weight"]


def test_missing_required_parameter_names_model_and_tensor():
    plan = plan_of("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n"
                   "    parameters: {weight: [{filter: mlp, value: 1}]}\n", depth=2)
    assert resolve(plan, "model.layers.0.mlp.up_proj.weight", 0).others[0].params["weight"] == 1.0
    with pytest.raises(UserError, match="missing required parameter 'weight' for model m, "
                       "tensor model.layers.0.self_attn.q_proj.weight"):
        resolve(plan, "model.layers.0.self_attn.q_proj.weight", 0)


def test_linear_gives_the_base_its_own_weight():
    """linear ignores the base as a base: it is an ordinary input that needs a weight (§18.5)."""
    text = ("merge_method: linear\nbase_model: b\nmodels:\n  - model: m\n"
            "    parameters: {weight: 2}\n")
    with pytest.raises(UserError, match="missing required parameter 'weight' for model b"):
        resolve(plan_of(text, 2), "lm_head.weight", POST)
    merge = resolve(plan_of(text + "parameters: {weight: 1}\n", 2), "lm_head.weight", POST)
    assert merge.base is None and per_model(merge, "weight") == [(2.0,), (1.0,)]
    assert method_params(merge) == {"weights": [2.0, 1.0], "normalize": True}


def test_task_arithmetic_passes_on_only_what_has_an_effect():
    plan = plan_of(f"{GTA}parameters: {{weight: 0.5, density: 0.3, rescale: true}}\n", 1)
    merge = resolve(plan, "lm_head.weight", POST)
    assert merge.others[0].params == {"weight": 0.5, "density": 0.3}
    assert method_params(merge) == {"weights": [0.5], "normalize": False, "scaling": 1.0}


def test_della_epsilon_window_fails_in_preflight():
    plan = plan_of("merge_method: della\nbase_model: b\nmodels:\n  - model: m\n"
                   "    parameters: {weight: 1, density: 0.1}\n", 2)
    with pytest.raises(UserError, match="density - epsilon > 0"):
        resolve(plan, "lm_head.weight", POST)


# --- models: vs slices: plans (§18.6) ------------------------------------------------------
def test_models_form_is_one_slice_with_the_base_appended():
    plan = plan_of("merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: m\n"
                   "parameters: {weight: 1}\n", depth=3)
    assert [(layer.x, layer.sources) for layer in plan.layers] == [
        (0.0, ((ModelRef("m"), 0), (ModelRef("b"), 0))),
        (0.5, ((ModelRef("m"), 1), (ModelRef("b"), 1))),
        (1.0, ((ModelRef("m"), 2), (ModelRef("b"), 2)))]
    assert resolve(plan, "model.layers.2.mlp.up_proj.weight", 2).base.model == ModelRef("b")


def test_slices_renumber_layers_and_restart_x():
    text = ("merge_method: passthrough\nslices:\n"
            "  - sources: [{model: a, layer_range: [0, 2]}]\n"
            "  - sources: [{model: b, layer_range: [5, 6]}]\n"
            "  - sources: [{model: a, layer_range: [1, 4]}]\n")
    plan = plan_of(text, depth=6)
    assert plan.num_hidden_layers == 6
    assert [(layer.slice, layer.x, layer.sources) for layer in plan.layers] == [
        (0, 0.0, ((ModelRef("a"), 0),)), (0, 1.0, ((ModelRef("a"), 1),)),
        (1, 1.0, ((ModelRef("b"), 5),)),  # a one-layer slice sits at x = 1
        (2, 0.0, ((ModelRef("a"), 1),)), (2, 0.5, ((ModelRef("a"), 2),)),
        (2, 1.0, ((ModelRef("a"), 3),))]
    assert resolve(plan, "model.layers.2.mlp.up_proj.weight", 2).others[0].tensor == \
        "model.layers.5.mlp.up_proj.weight"
    assert resolve(plan, "model.embed_tokens.weight", PRE).others[0].model == ModelRef("a")
    assert resolve(plan, "model.norm.weight", POST).others[0].model == ModelRef("a")
    assert referenced_models(plan.config) == (ModelRef("a"), ModelRef("b"))


@pytest.mark.parametrize("text, depths, message", [
    ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 9]}]\n",
     {"a": 8}, r"slices\[0\]: layer_range \[0, 9\] goes past the 8 layers of a"),
    ("merge_method: task_arithmetic\nbase_model: b\nparameters: {weight: 1}\n"
     "models:\n  - model: m\n", {"m": 8, "b": 6},
     r"models: all models must have the same number of layers, got \[6, 8\]"),
])
def test_plan_refuses_layer_counts(text, depths, message):
    with pytest.raises(UserError, match=message):
        plan_merge(load_config(text), {ModelRef(k): v for k, v in depths.items()})


# --- model references (§18.2) and top-level keys (§18.1) -----------------------------------
@pytest.mark.parametrize("ref, expected", [
    ("org/name", ModelRef("org/name")),
    ("org/name@v1.0", ModelRef("org/name", "v1.0")),
    ("{model: org/name@main}", ModelRef("org/name", "main")),
    ("{model: {path: ./m, revision: abc}}", ModelRef("./m", "abc")),
])
def test_model_references(ref, expected):
    config = load_config(f"merge_method: passthrough\nmodels:\n  - model: {ref}\n")
    assert config.models[0].model == expected
    assert load_config(to_yaml(config)) == config


def test_top_level_keys_are_read_and_written():
    text = (f"{GTA}parameters: {{weight: 1}}\ndtype: torch.float16\nout_dtype: bfloat16\n"
            "tokenizer: {source: base}\nchat_template: auto\nseed: 7\n")
    config = load_config(text)
    assert (config.dtype, config.out_dtype, config.tokenizer_source, config.chat_template,
            config.seed) == ("float16", "bfloat16", "base", "auto", 7)
    assert load_config(to_yaml(config)) == config
    assert load_config(f"{GTA}tokenizer_source: base\n").tokenizer_source == "base"
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_config(f"{GTA}chat_template: \"{template}\"\n").chat_template == template


@pytest.mark.parametrize("text, source, pad", [
    ("tokenizer_source: union\n", "union", None),
    ("tokenizer: {}\n", "union", None),   # mergekit's default source when the block is given
    ("tokenizer_source: org/model@v2\n", ModelRef("org/model", "v2"), None),
    ("tokenizer: {source: {model: {path: ./m, revision: r}}, pad_to_multiple_of: 64}\n",
     ModelRef("./m", "r"), 64),
    ("tokenizer: {source: base, pad_to_multiple_of: 8}\n", "base", 8),
])
def test_tokenizer_sources_are_read_and_written(text, source, pad):
    config = load_config(GTA + text)
    assert (config.tokenizer_source, config.pad_to_multiple_of, config.vocab) == (source, pad, None)
    assert load_config(to_yaml(config)) == config


def test_per_token_sources_are_read_and_written():
    config = load_config(
        f"{GTA}tokenizer:\n  tokens:\n"
        "    '<a>': {source: m}\n"
        "    '<b>': {source: {kind: zero}, force: true}\n"
        "    '<c>': {source: {kind: model_token, model: b@v1, token: '</s>'}}\n"
        "    '<d>': {source: {kind: model_token, model: m, token_id: 7}}\n")
    assert config.tokens == {"<a>": TokenSource(ModelRef("m")),
                             "<b>": TokenSource(None, force=True),
                             "<c>": TokenSource(ModelRef("b", "v1"), "</s>"),
                             "<d>": TokenSource(ModelRef("m"), 7)}
    assert config.tokenizer_source == "union"
    assert load_config(to_yaml(config)) == config


def test_our_vocab_union_has_its_own_key():
    """`tokenizer_source: union` is mergekit's union by token; `vocab: union` is --vocab union."""
    config = load_config(f"{GTA}vocab: union\n")
    assert (config.vocab, config.tokenizer_source) == ("union", None)
    assert load_config(to_yaml(config)) == config


def test_fourier_is_an_alias_of_fr_merging():
    config = load_config("merge_method: fourier\nbase_model: b\nmodels:\n  - model: m\n"
                         "    parameters: {weight: 0.8}\nparameters: {lambda: 1.1}\n")
    merge = resolve(plan_merge(config, {ModelRef("b"): 1, ModelRef("m"): 1}), "lm_head.weight",
                    POST)
    assert method_params(merge) == {"weights": [0.8], "scaling": 1.1, "normalize": False,
                                    "fr_ratio": 0.9, "fr_faithful": False}


def test_read_from_a_file(tmp_path):
    path = tmp_path / "merge.yml"
    path.write_text(EXAMPLE_A)
    assert load_config(path) == load_config(str(path)) == load_config(EXAMPLE_A)
    with pytest.raises(UserError, match="missing.yml: cannot read the config"):
        load_config(str(tmp_path / "missing.yml"))


# --- refusals: one line naming the key and the file ----------------------------------------
@pytest.mark.parametrize("text, message", [
    (f"{GTA}paramters: {{weight: 1}}\n",
     "unknown key 'paramters' at the top level; did you mean 'parameters'?"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    paramters: {weight: 1}\n",
     "unknown key 'paramters' in models[0]; did you mean 'parameters'?"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    weight: 1\n",
     "unknown key 'weight' in models[0]; method parameters go under 'parameters:'"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n"
     "    parameters: {weight: 1, desnity: 0.5}\n",
     "unknown parameter 'desnity' in models[0].parameters for this merge_method; did you mean "
     "'density'?"),
    (f"{GTA}parameters: {{weight: 1, gamma: 0.1}}\n", "unknown parameter 'gamma' in parameters"),
    ("merge_method: slerp\nbase_model: b\nslices:\n  - sources:\n"
     "      - {model: b, layer_range: [0, 2]}\n      - {model: m, layer_range: [0, 2]}\n"
     "    paramters: {t: 0.5}\n", "unknown key 'paramters' in slices[0]; did you mean"),
    ("merge_method: passthrough\nslices:\n  - sources:\n"
     "      - {model: m, layer_range: [0, 2], layer_rnge: [0, 1]}\n",
     "unknown key 'layer_rnge' in slices[0].sources[0]; did you mean 'layer_range'?"),
    (f"{GTA}parameters: {{weight: [{{filter: mlp, vaule: 1}}]}}\n",
     "unknown key 'vaule' in parameters.weight[0]; did you mean 'value'?"),
    ("merge_method: tie\nbase_model: b\nmodels:\n  - model: m\n",
     "merge_method: unknown method 'tie'; did you mean 'ties'?"),
    (f"{GTA}name: my-merge\n", "unknown key 'name' at the top level"),
    (f"{GTA}lambda: 2\n",
     "unknown key 'lambda' at the top level; method parameters go under 'parameters:'"),
        ("merge_method: slerp\nbase_model: b\nmodels:\n  - model: b\n  - model: m\n"
     "    parameters: {t: 0.5}\n",
     "models[1].parameters.t: 't' is shared by all models, so it has no effect here"),
])
def test_unknown_and_misplaced_keys_are_refused_in_one_line(text, message):
    with pytest.raises(UserError) as err:
        load_config(text)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("<config>: ")


def test_refusals_name_the_file(tmp_path):
    path = tmp_path / "FILE.yml"
    path.write_text("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n"
                    "  - model: n\n    paramters: {weight: 1}\n")
    with pytest.raises(UserError, match=r"FILE.yml: unknown key 'paramters' in models\[1\]; "
                       "did you mean 'parameters'\\?$"):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    (f"{GTA}modules: {{}}\n", "'modules' at the top level is not supported"),
    ("merge_method: passthrough\nmodels:\n  - model: a+my/lora\n",
     "models[0].model: 'a+my/lora': model+lora references are not supported"),
    ("merge_method: passthrough\nmodels:\n  - model: a@b@c\n",
     "expected 'path' or 'path@revision'"),
    ("merge_method: passthrough\nmodels:\n  - model: {model: a, lora: x}\n",
     "'lora' in models[0].model is not supported"),
    ("merge_method: passthrough\nmodels:\n  - model: {model: a, override_architecture: X}\n",
     "'override_architecture' in models[0].model is not supported"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"
     "    residual_weight: 0.5\n", "'residual_weight' in slices[0] is not supported"),
    (f"{GTA}tokenizer_source: base\ntokenizer: {{source: base}}\n",
     "give one of 'tokenizer', 'tokenizer_source' or 'vocab', not 'tokenizer' and "
     "'tokenizer_source'"),
    (f"{GTA}tokenizer_source: a+lora\n", "tokenizer_source: 'a+lora': model+lora references"),
    (f"{GTA}tokenizer: {{pad_to_multiple_of: 0}}\n",
     "tokenizer.pad_to_multiple_of: expected a whole number >= 1, got 0"),
    (f"{GTA}vocab: base\n", "vocab: expected 'union' (merge.py --vocab union"),
    (f"{GTA}tokenizer: {{tokens: {{x: {{}}}}}}\n", "tokenizer.tokens.x.source: required"),
    (f"{GTA}tokenizer: {{tokens: {{x: {{source: {{kind: one}}}}}}}}\n",
     "tokenizer.tokens.x.source.kind: expected 'model_token' or 'zero', got 'one'"),
    (f"{GTA}tokenizer: {{tokens: {{x: {{source: {{kind: model_token, model: m}}}}}}}}\n",
     "tokenizer.tokens.x.source: give one of 'token' (a text) or 'token_id' (a row)"),
    (f"{GTA}tokenizer: {{tokens: {{x: {{source: m, force: 1}}}}}}\n",
     "tokenizer.tokens.x.force: expected true or false, got 1"),
    (f"{GTA}tokenizer: {{tokens: {{1: {{source: m}}}}}}\n",
     "tokenizer.tokens.1: a token is a text; quote it"),
    (f"{GTA}dtype: bf16\n", "dtype: expected one of bfloat16, float16, float32, float64"),
    (f"{GTA}chat_template: vicuna\n", "chat_template: expected auto or a Jinja template, got"),
    (f"{GTA}chat_template: chatml\n", "chat_template: 'chatml' names a template file of "
     "mergekit's, which this toolkit does not ship; give the Jinja template itself or auto"),
    ("base_model: b\nmodels:\n  - model: m\n", "'merge_method' is required"),
    ("merge_method: linear\nmodels: [{model: a}]\nslices: []\n",
     "give exactly one of 'models' or 'slices'"),
    ("merge_method: linear\n", "give exactly one of 'models' or 'slices'"),
    ("merge_method: linear\nmodels: []\n", "models: expected a non-empty list"),
    (f"{GTA}parameters: {{weight: [1, {{filter: mlp, value: 2}}]}}\n",
     "parameters.weight: a list is either values (a gradient) or {filter, value} entries"),
    (f"{GTA}parameters: {{weight: [{{filter: mlp, value: {{filter: a, value: 1}}}}]}}\n",
     "parameters.weight[0].value: expected a value or a list of values (filters do not nest)"),
    (f"{GTA}parameters: {{weight: [{{filter: mlp}}]}}\n", "parameters.weight[0].value: expected"),
    (f"{GTA}parameters: {{weight: [[1, 2]]}}\n", "parameters.weight[0]: expected a finite number"),
    (f"{GTA}parameters: {{weight: high}}\n", "parameters.weight: expected a finite number"),
    (f"{GTA}parameters: {{weight: .nan}}\n", "parameters.weight: expected a finite number"),
    (f"{GTA}parameters: {{normalize: 1}}\n", "parameters.normalize: expected true or false"),
    (f"{GTA}parameters: {{weight: [{{filter: 3, value: 1}}]}}\n",
     "parameters.weight[0].filter: expected a text"),
    (f"{GTA}seed: -1\n", "seed: expected a whole number >= 0"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [5, 3]}]\n",
     "slices[0].sources[0].layer_range: expected [first, end) with 0 <= first < end"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: a}]\n",
     "slices[0].sources[0].layer_range: expected [first, end)"),
    ("merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n"
     "      - {model: b, layer_range: [0, 3]}\n",
     "slices[0]: all sources of a slice must span the same number of layers"),
    ("merge_method: ties\nmodels:\n  - model: m\n", "models: merge_method ties needs a base_model"),
    ("merge_method: slerp\nbase_model: b\nslices:\n  - sources:\n"
     "      - {model: a, layer_range: [0, 2]}\n      - {model: m, layer_range: [0, 2]}\n",
     "slices[0]: the base model b must be one of the slice's sources"),
    ("merge_method: passthrough\nmodels:\n  - model: a\n  - model: b\n",
     "models: merge_method passthrough takes exactly 1 input model(s), got 2"),
    ("merge_method: passthrough\nbase_model: b\nmodels:\n  - model: a\n",
     "merge_method passthrough takes exactly 1 input model(s), got 2"),  # base appended
    ("merge_method: slerp\nbase_model: b\nmodels:\n  - model: a\n  - model: c\n",
     "merge_method slerp takes exactly 1 model(s) besides the base, got 2"),
    ("merge_method: model_stock\nbase_model: b\nmodels:\n  - model: a\n",
     "merge_method model_stock takes at least 2 model(s) besides the base, got 1"),
    ("merge_method: ties\nmodels: [\n", "<config>: not valid YAML"),
    ("- merge_method: ties\n", "expected a mapping of mergekit keys"),
])
def test_unsupported_and_invalid_forms_are_refused(text, message):
    with pytest.raises(UserError) as err:
        load_config(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_parameters_of_the_base_are_accepted_with_a_warning(caplog):
    """Real-world configs often give the base a weight; mergekit ignores it (§18.5)."""
    config = load_config("merge_method: ties\nbase_model: b\nmodels:\n"
                         "  - model: b\n    parameters: {weight: 1}\n"
                         "  - model: m\n    parameters: {weight: 1}\n")
    assert "parameters of the base model b have no effect" in caplog.text
    merge = resolve(plan_merge(config, {ModelRef("b"): 1, ModelRef("m"): 1}), "x", PRE)
    assert merge.base.params == {} and [i.model for i in merge.others] == [ModelRef("m")]


def test_slerp_t_only_at_model_level_is_refused_not_ignored():
    """mergekit ignores a shared parameter under a model, then fails on the missing t."""
    with pytest.raises(UserError, match="'t' is shared by all models"):
        load_config("merge_method: slerp\nbase_model: b\nmodels:\n  - model: b\n"
                    "  - model: m\n    parameters: {t: 0.3}\n")


BOOLEAN_GRADIENTS = """
merge_method: ties
base_model: A
slices:
  - sources:
      - {model: A, layer_range: [0, 4]}
      - {model: B, layer_range: [0, 4], parameters: {weight: [true, 0.5]}}
    parameters: {normalize: [true, false, true], rescale: [false, true]}
parameters: {lambda: [true, false], density: 0.5}
"""


@pytest.mark.parametrize("layer, normalize, rescale, scale, weight", [
    (0, True, False, 1.0, 1.0), (1, True, False, 2 / 3, 5 / 6),
    (2, False, False, 1 / 3, 2 / 3), (3, True, True, 0.0, 0.5),
])
def test_boolean_gradients_in_a_config_match_mergekit(layer, normalize, rescale, scale, weight):
    """A bool parameter's list is picked (entry floor(x(K-1))); a float parameter's list of
    booleans is read as numbers and blended: the values mergekit 0.1.5's planner gives for this
    config over 4 layers (checked by running it)."""
    merge = at(plan_of(BOOLEAN_GRADIENTS, depth=4), f"model.layers.{layer}.mlp.up_proj.weight")
    assert (merge.shared["normalize"], merge.shared["rescale"]) == (normalize, rescale)
    assert merge.shared["lambda"] == pytest.approx(scale, abs=1e-12)
    assert per_model(merge, "weight") == [(pytest.approx(weight, abs=1e-12),)]
