"""The method contract (registry.py): parameters declared once give the CLI flags, validation and
the recipe; a recipe validates itself when built; a new method is one function plus one row."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import merge
from checkpoints.errors import UserError
from merging_methods.params import Param
from merging_methods.recipe import MergeRecipe
from merging_methods.registry import METHODS, declared_params, method
from tests.test_merge_cli import family, load_weights  # noqa: F401 - the fixture is used


def test_every_declared_param_has_its_flag_with_the_methods_defaults():
    parser = merge.build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    for param in declared_params().values():
        assert param.flag in flags, param.name
    helps = {a.dest: a.help for a in parser._actions}
    assert "on for della, linear, ties; off otherwise" in helps["normalize"]
    assert declared_params()["scaling"].flag == "--lambda"
    assert declared_params()["weights"].mergekit == "weight"


def recipe(**changes) -> MergeRecipe:
    fields = {"method": "ties", "base_model": "B", "models": ("A", "C"), "save_path": "O"}
    return MergeRecipe(**{**fields, **changes})


def test_recipe_resolves_its_params_when_built():
    built = recipe(params={"density": 0.3})
    assert built.params == {"weights": [1.0, 1.0], "scaling": 1.0, "density": [0.3, 0.3],
                            "normalize": True, "rescale": False, "mergekit_trim": False}
    assert recipe(params=built.params) == built   # resolving a resolved recipe changes nothing
    assert built.as_record()["params"]["density"] == [0.3, 0.3]


@pytest.mark.parametrize("changes, fragment", [
    ({"method": "tie"}, "--method: unknown method 'tie'"),
    ({"models": ()}, "--models_to_merge"),
    ({"params": {"density": 1.5}}, "--density: 1.5 is outside the allowed range (must be in (0, 1])"),
    ({"params": {"density": [0.5, 0.5, 0.5]}}, "--density: 3 values for 2 models"),
    ({"params": {"desnity": 0.5}}, "desnity does not apply to --method ties; it takes --density"),
    ({"params": {"above_average_value_ratio": 2.0}}, "--above_average_value_ratio does not apply"),
    ({"params": {"rescale": "yes"}}, "--rescale: expected true or false"),
    ({"vocab": "all"}, "--vocab: expected one of base, union"),
    ({"dtype": "int8"}, "--dtype"),
    ({"max_shard_size": "lots"}, "--max_shard_size"),
])
def test_recipe_refuses_bad_values_naming_the_flag(changes, fragment):
    with pytest.raises(UserError) as err:
        recipe(**changes)
    assert fragment in str(err.value)


def test_a_new_method_is_one_function_and_one_row(family, tmp_path, monkeypatch):  # noqa: F811
    """A method registered with a new parameter and every context key: merge.py takes its flag,
    the runner streams whole float32 tensors to it with exactly that context, and the recipe
    records the parameter."""
    base, fts = family
    seen = {}

    def shift(base, others, *, amount, tensor_name, layer_index, num_layers,
              is_input_embedding, generators):
        assert base.dtype == torch.float32 and all(o.dtype == torch.float32 for o in others)
        seen[tensor_name] = (layer_index, num_layers, is_input_embedding, len(generators))
        return base + amount

    amount = Param("amount", float, 0.0, help="added to every weight", low=-1.0, high=1.0)
    monkeypatch.setitem(METHODS, "shift", method(
        "shift", shift, "base + amount", amount,
        context=frozenset({"tensor_name", "layer_index", "num_layers", "is_input_embedding",
                           "generators"})))
    out = tmp_path / "shift"
    assert merge.main(["--method", "shift", "--base_model", str(base), "--models_to_merge",
                       ",".join(map(str, fts)), "--amount", "0.5", "--save_path", str(out)]) == 0
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert seen["model.layers.1.mlp.up_proj.weight"] == (1, layers, False, 3)
    assert seen["model.embed_tokens.weight"] == (None, layers, True, 3)
    got, want = load_weights(out), load_weights(base)
    assert all(torch.equal(got[n], want[n] + 0.5) for n in want)
    assert yaml.safe_load((out / "merge_recipe.yaml").read_text())["merge"]["params"] == {"amount": 0.5}
    assert merge.main(["--method", "shift", "--base_model", str(base), "--models_to_merge",
                       str(fts[0]), "--amount", "2", "--save_path", str(tmp_path / "o")]) == 2
