"""mergekit YAML configurations, read with mergekit 0.1.5's rules (ALGORITHMS.md §18).

    config = load_config("merge.yml")              # validated; a bad key is one UserError line
    plan = plan_merge(config, {ref: 32 for ref in referenced_models(config)})
    merge = resolve(plan, "model.layers.8.mlp.up_proj.weight", 8)   # inputs + values, one tensor
    to_yaml(config)                                # load_config(to_yaml(c)) == c

mergekit silently ignores keys it does not know (a misspelt `desnity` falls back to a default);
here every key that is unknown, misplaced or unsupported is refused with one line naming it.
Pure: no torch and no I/O beyond reading the YAML text. The per-tensor rules (scopes, filters,
gradients, slices) are in `mergekit_plan`, the method parameter tables in `mergekit_methods`.
"""
from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Mapping, Union

import yaml

from checkpoints.errors import UserError
from merging_methods.mergekit_methods import (BASE_AVERAGED_IN, BASE_OPTIONAL, BOOL_PARAMS, METHODS,
                                              TEXT_CHOICES, MethodParams)
from merging_methods.registry import ALIASES

log = logging.getLogger(__name__)

Scalar = Union[float, bool, str]


@dataclass(frozen=True)
class Gradient:
    """A list setting: values spread over layer depth (§18.4)."""

    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Rule:
    """A `{filter, value}` entry: applies where `filter` is None, "*" or a substring of the name."""

    filter: str | None
    value: Scalar | Gradient


Setting = Union[Scalar, Gradient, tuple[Rule, ...]]  # a tuple of rules: first match wins
Params = Mapping[str, Setting]


@dataclass(frozen=True)
class ModelRef:
    """A hub id or local path, optionally at a revision (`path@revision`, §18.2)."""

    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.path if self.revision is None else f"{self.path}@{self.revision}"


@dataclass(frozen=True)
class TokenSource:
    """A `tokenizer.tokens` entry: the row of `model` (None: zeros) for its own token `token`
    (a text or an id; None: the same token), given to every model lacking it, or to every model
    when `force`."""

    model: ModelRef | None
    token: str | int | None = None
    force: bool = False


@dataclass(frozen=True)
class Source:
    """An entry of `models:` (layer_range None = all layers) or of `slices[s].sources`."""

    model: ModelRef
    parameters: Params = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None  # half-open [a, b), 0-based


@dataclass(frozen=True)
class Slice:
    """One entry of `slices:`; its own `base_model` overrides the top-level one."""

    sources: tuple[Source, ...]
    parameters: Params = field(default_factory=dict)
    base_model: ModelRef | None = None


@dataclass(frozen=True)
class MergeConfig:
    """A validated config; exactly one of `models` and `slices` is set."""

    merge_method: str
    models: tuple[Source, ...] | None = None
    slices: tuple[Slice, ...] | None = None
    base_model: ModelRef | None = None
    parameters: Params = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | ModelRef | None = None  # "base", "union" or a model (§18.8)
    pad_to_multiple_of: int | None = None  # tokenizer.pad_to_multiple_of: output rows rounded up
    tokens: Mapping[str, TokenSource] = field(default_factory=dict)  # tokenizer.tokens
    vocab: str | None = None  # our extension: "union" = merge.py --vocab union (§13.1)
    chat_template: str | None = None
    seed: int | None = None  # our extension (mergekit takes --random-seed); mergekit ignores it
    origin: str = field(default="<config>", compare=False)  # file name for error messages


DTYPES = ("bfloat16", "float16", "float32", "float64")
VOCAB_SOURCES = ("base", "union")  # or a model reference; `union` is not §13.1's (§18.8)
BUILTIN_TEMPLATES = ("alpaca", "chatml", "llama3", "mistral", "exaone")  # mergekit's files
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "seed", "vocab")
RECORD_KEYS = ("merge", "aim", "versions", "created")
"""What this toolkit writes beside the config in merge_recipe.yaml: read and ignored."""
UNSUPPORTED = {  # mergekit keys we refuse -> why
    "modules": "multi-module (vision-language) configs; use models: or slices:",
    "residual_weight": "mergekit 0.1.5 parses it but never applies it",
    "lora": "LoRA adapters", "override_architecture": "architecture overrides",
}


def load_config(text_or_path: str | Path) -> MergeConfig:
    """Parse and validate a mergekit config: YAML text, or a path (a `.yml`/`.yaml` string)."""
    origin, text = _read(text_or_path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{origin}: not valid YAML ({' '.join(str(err).split())})") from None
    config = _config(raw, origin)
    _check_inputs(config)
    return config


def _read(text_or_path: str | Path) -> tuple[str, str]:
    is_path = isinstance(text_or_path, Path) or (
        "\n" not in text_or_path and text_or_path.endswith((".yml", ".yaml")))
    if not is_path:
        return "<config>", str(text_or_path)
    try:
        return str(text_or_path), Path(text_or_path).read_text()
    except OSError as err:
        raise UserError(f"{text_or_path}: cannot read the config ({err.strerror})") from None


def _fail(origin: str, where: str, message: str) -> UserError:
    return UserError(f"{origin}: {where + ': ' if where else ''}{message}")


def _check_keys(raw: Mapping, allowed: Collection[str], where: str, origin: str,
                params: Collection[str] = ()) -> None:
    """Refuse the first key not in `allowed`, suggesting the closest allowed one."""
    for key in raw:
        if key in allowed:
            continue
        place = f"in {where}" if where else "at the top level"
        if key in UNSUPPORTED:
            raise UserError(f"{origin}: {key!r} {place} is not supported ({UNSUPPORTED[key]})")
        if key in params:
            hint = "; method parameters go under 'parameters:'"
        else:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; expected {', '.join(allowed)}"
        raise UserError(f"{origin}: unknown key {key!r} {place}{hint}")


def _config(raw: object, origin: str) -> MergeConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: expected a mapping of mergekit keys (merge_method, ...)")
    method = _method(raw.get("merge_method"), origin)
    spec = METHODS[method]
    _check_keys(raw, TOP_KEYS + RECORD_KEYS, "", origin, params=[*spec.per_model, *spec.shared])
    if ("models" in raw) == ("slices" in raw):
        raise _fail(origin, "", "give exactly one of 'models' or 'slices'")
    models = slices = None
    if "models" in raw:
        models = _list(raw["models"], "models", origin, lambda e, w: _source(e, w, spec, origin))
    else:
        slices = _list(raw["slices"], "slices", origin, lambda e, w: _slice(e, w, spec, origin))
    return MergeConfig(
        merge_method=method, models=models, slices=slices,
        base_model=_optional_ref(raw.get("base_model"), "base_model", origin),
        parameters=_params(raw.get("parameters"), "parameters", spec, origin, shared=True),
        dtype=_dtype(raw.get("dtype"), "dtype", origin),
        out_dtype=_dtype(raw.get("out_dtype"), "out_dtype", origin),
        **_tokenizer(raw, origin),
        chat_template=_chat_template(raw.get("chat_template"), origin),
        seed=_seed(raw.get("seed"), origin), origin=origin)


def _method(value: object, origin: str) -> str:
    if value is None:
        raise _fail(origin, "", "'merge_method' is required")
    name = ALIASES.get(str(value), str(value))
    if name in METHODS:
        return name
    close = difflib.get_close_matches(name, [*METHODS, *ALIASES], n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(METHODS)}"
    raise _fail(origin, "merge_method", f"unknown method {name!r}; {hint}")


def _list(value: object, where: str, origin: str, item) -> tuple:
    if not isinstance(value, list) or not value:
        raise _fail(origin, where, "expected a non-empty list")
    return tuple(item(entry, f"{where}[{i}]") for i, entry in enumerate(value))


def _mapping(value: object, where: str, origin: str) -> Mapping:
    if not isinstance(value, dict):
        raise _fail(origin, where, f"expected a mapping, got {value!r}")
    return value


def _source(entry: object, where: str, spec: MethodParams, origin: str,
            sliced: bool = False) -> Source:
    entry = _mapping(entry, where, origin)
    keys = ("model", "layer_range", "parameters") if sliced else ("model", "parameters")
    _check_keys(entry, keys, where, origin, params=[*spec.per_model, *spec.shared])
    if "model" not in entry:
        raise _fail(origin, where, "'model' is required")
    return Source(model=_ref(entry["model"], f"{where}.model", origin),
                  parameters=_params(entry.get("parameters"), f"{where}.parameters", spec, origin,
                                     shared=False),
                  layer_range=_layer_range(entry.get("layer_range"), f"{where}.layer_range",
                                           origin) if sliced else None)


def _slice(entry: object, where: str, spec: MethodParams, origin: str) -> Slice:
    entry = _mapping(entry, where, origin)
    _check_keys(entry, ("sources", "base_model", "parameters"), where, origin,
                params=[*spec.per_model, *spec.shared])
    sources = _list(entry.get("sources"), f"{where}.sources", origin,
                    lambda e, w: _source(e, w, spec, origin, sliced=True))
    if len({b - a for a, b in (s.layer_range for s in sources)}) > 1:
        raise _fail(origin, where, "all sources of a slice must span the same number of layers")
    return Slice(sources=sources,
                 parameters=_params(entry.get("parameters"), f"{where}.parameters", spec, origin,
                                    shared=True),
                 base_model=_optional_ref(entry.get("base_model"), f"{where}.base_model", origin))


def _layer_range(value: object, where: str, origin: str) -> tuple[int, int]:
    ok = (isinstance(value, list) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    if not ok or not 0 <= value[0] < value[1]:
        raise _fail(origin, where, f"expected [first, end) with 0 <= first < end, got {value!r}")
    return value[0], value[1]


def _ref(value: object, where: str, origin: str) -> ModelRef:
    """A model reference: "path", "path@revision" or {model: "path" | {path, revision}}."""
    if isinstance(value, dict):
        _check_keys(value, ("model",), where, origin)
        inner = value.get("model")
        if isinstance(inner, dict):
            _check_keys(inner, ("path", "revision"), f"{where}.model", origin)
            path, revision = inner.get("path"), inner.get("revision")
            if isinstance(path, str) and path and (revision is None or isinstance(revision, str)):
                return _ref_text(str(ModelRef(path, revision)), where, origin)
            raise _fail(origin, where, "expected {path: <id or folder>, revision: <optional>}")
        value = inner
    if not isinstance(value, str):
        raise _fail(origin, where, f"expected a model id or folder, got {value!r}")
    return _ref_text(value, where, origin)


def _ref_text(text: str, where: str, origin: str) -> ModelRef:
    if "+" in text:
        raise _fail(origin, where, f"{text!r}: model+lora references are not supported")
    parts = text.split("@")
    if len(parts) > 2 or not all(parts):
        raise _fail(origin, where, f"{text!r}: expected 'path' or 'path@revision'")
    return ModelRef(parts[0], parts[1] if len(parts) == 2 else None)


def _optional_ref(value: object, where: str, origin: str) -> ModelRef | None:
    return None if value is None else _ref(value, where, origin)


def _params(raw: object, where: str, spec: MethodParams, origin: str, shared: bool) -> dict:
    """Validate a `parameters:` mapping; `shared=False` for a model's own (per-model only)."""
    if raw is None:
        return {}
    known = [*spec.per_model, *spec.shared]
    out = {}
    for name, value in _mapping(raw, where, origin).items():
        if name in spec.shared and not shared:
            raise _fail(origin, f"{where}.{name}", f"{name!r} is shared by all models, so it has "
                        "no effect here (mergekit ignores it); set it in the top-level or slice "
                        "parameters:")
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = (f"did you mean {close[0]!r}?" if close
                    else f"it takes {', '.join(known) or 'no parameters'}")
            raise UserError(f"{origin}: unknown parameter {name!r} in {where} for this "
                            f"merge_method; {hint}")
        out[name] = _setting(value, name, f"{where}.{name}", origin)
    return out


def _setting(value: object, name: str, where: str, origin: str) -> Setting:
    """A scalar, a gradient (list of scalars) or a filter list (§18.3)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return _scalar(value, name, where, origin)
    if value and all(isinstance(v, dict) for v in value):
        return tuple(_rule(v, name, f"{where}[{i}]", origin) for i, v in enumerate(value))
    if any(isinstance(v, dict) for v in value):
        raise _fail(origin, where, "a list is either values (a gradient) or {filter, value} "
                    "entries, not both")
    return Gradient(tuple(_scalar(v, name, f"{where}[{i}]", origin) for i, v in enumerate(value))
                    ) if value else ()


def _rule(entry: Mapping, name: str, where: str, origin: str) -> Rule:
    _check_keys(entry, ("filter", "value"), where, origin)
    pattern, value = entry.get("filter"), entry.get("value")
    if pattern is not None and not isinstance(pattern, str):
        raise _fail(origin, f"{where}.filter", f"expected a text, got {pattern!r}")
    if "value" not in entry or isinstance(value, dict) or (
            isinstance(value, list) and (not value or any(isinstance(v, dict) for v in value))):
        raise _fail(origin, f"{where}.value", "expected a value or a list of values (filters "
                    "do not nest)")
    setting = _setting(value, name, f"{where}.value", origin)
    return Rule(pattern, setting)


def _scalar(value: object, name: str, where: str, origin: str) -> Scalar:
    """Validate to the parameter's type: bool, text (a choice or a model reference), or float
    (true -> 1.0, "1e-5" -> 1e-05)."""
    if name in TEXT_CHOICES:
        choices = TEXT_CHOICES[name]
        if isinstance(value, str) and value and (choices is None or value in choices):
            return value
        wanted = "a model reference" if choices is None else f"one of {', '.join(choices)}"
        raise _fail(origin, where, f"expected {wanted}, got {value!r}")
    if name in BOOL_PARAMS:
        if isinstance(value, bool):
            return value
        raise _fail(origin, where, f"expected true or false, got {value!r}")
    try:
        number = float(value) if isinstance(value, (int, float, str)) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise _fail(origin, where, f"expected a finite number, got {value!r}")
    return number


def _dtype(value: object, key: str, origin: str) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise _fail(origin, key, f"expected one of {', '.join(DTYPES)}, got {value!r}")
    return name


def _tokenizer(raw: Mapping, origin: str) -> dict[str, object]:
    """tokenizer_source, pad_to_multiple_of, tokens and vocab (our --vocab union), at most one
    way."""
    given = [k for k in ("tokenizer", "tokenizer_source", "vocab") if k in raw]
    if len(given) > 1:
        raise _fail(origin, "", f"give one of 'tokenizer', 'tokenizer_source' or 'vocab', not "
                    f"{' and '.join(repr(k) for k in given)}")
    if "vocab" in raw:
        if raw["vocab"] != "union":
            raise _fail(origin, "vocab", f"expected 'union' (merge.py --vocab union, §13.1's "
                        f"pad-token union), got {raw['vocab']!r}; for the base vocabulary use "
                        "tokenizer_source: base")
        return {"vocab": "union"}
    pad, tokens = None, {}
    if "tokenizer" in raw:
        block = _mapping(raw["tokenizer"], "tokenizer", origin)
        _check_keys(block, ("source", "tokens", "pad_to_multiple_of"), "tokenizer", origin)
        where, source = "tokenizer.source", block.get("source", "union")
        pad = block.get("pad_to_multiple_of")
        if block.get("tokens") is not None:
            tokens = _tokens(block["tokens"], origin)
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise _fail(origin, "tokenizer.pad_to_multiple_of",
                        f"expected a whole number >= 1, got {pad!r}")
    else:
        where, source = "tokenizer_source", raw.get("tokenizer_source")
    if source is not None and source not in VOCAB_SOURCES:
        source = _ref(source, where, origin)
    return {"tokenizer_source": source, "pad_to_multiple_of": pad, "tokens": tokens}


def _tokens(raw: object, origin: str) -> dict[str, TokenSource]:
    """tokenizer.tokens: {token: {source: <model> | {kind: model_token, model, token | token_id}
    | {kind: zero}, force: bool}} (mergekit's per-token embedding sources)."""
    out = {}
    for token, entry in _mapping(raw, "tokenizer.tokens", origin).items():
        where = f"tokenizer.tokens.{token}"
        if not isinstance(token, str):
            raise _fail(origin, where, "a token is a text; quote it")
        entry = _mapping(entry, where, origin)
        _check_keys(entry, ("source", "force"), where, origin)
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise _fail(origin, f"{where}.force", f"expected true or false, got {force!r}")
        out[token] = _token_source(entry.get("source"), f"{where}.source", origin, force)
    return out


def _token_source(value: object, where: str, origin: str, force: bool) -> TokenSource:
    if not isinstance(value, dict) or "kind" not in value:
        if value is None:
            raise _fail(origin, where, "required: a model, {kind: model_token, model, token} or "
                        "{kind: zero}")
        return TokenSource(_ref(value, where, origin), None, force)
    if value["kind"] == "zero":
        _check_keys(value, ("kind",), where, origin)
        return TokenSource(None, None, force)
    if value["kind"] != "model_token":
        raise _fail(origin, f"{where}.kind", f"expected 'model_token' or 'zero', got "
                    f"{value['kind']!r}")
    _check_keys(value, ("kind", "model", "token", "token_id"), where, origin)
    if ("token" in value) == ("token_id" in value):
        raise _fail(origin, where, "give one of 'token' (a text) or 'token_id' (a row)")
    token = value.get("token", value.get("token_id"))
    valid = (isinstance(token, str) and token) if "token" in value else (
        isinstance(token, int) and not isinstance(token, bool) and token >= 0)
    if not valid:
        raise _fail(origin, where, f"expected a token text or a whole token_id >= 0, got "
                    f"{token!r}")
    return TokenSource(_ref(value.get("model"), f"{where}.model", origin), token, force)


def _chat_template(value: object, origin: str) -> str | None:
    """`auto` or a Jinja template; mergekit's built-in names are refused (its template files are
    not shipped here)."""
    if value is None or value == "auto" or (
            isinstance(value, str) and "{" in value and len(value) >= 20):
        return value
    if value in BUILTIN_TEMPLATES:
        raise _fail(origin, "chat_template", f"{value!r} names a template file of mergekit's, "
                    "which this toolkit does not ship; give the Jinja template itself or auto")
    raise _fail(origin, "chat_template", f"expected auto or a Jinja template, got {value!r}")


def _seed(value: object, origin: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise _fail(origin, "seed", f"expected a whole number >= 0, got {value!r}")


def effective_slices(config: MergeConfig) -> tuple[Slice, ...]:
    """The config as slices (§18.6): `models:` is one slice of all models plus the base when it
    is not listed (layer_range None = all layers); a slice without base_model gets the top one."""
    if config.slices is not None:
        return tuple(Slice(s.sources, s.parameters, s.base_model or config.base_model)
                     for s in config.slices)
    sources = config.models
    if config.base_model is not None and config.base_model not in {s.model for s in sources}:
        sources += (Source(config.base_model),)
    return (Slice(sources, {}, config.base_model),)


def base_index(config: MergeConfig, piece: Slice) -> int | None:
    """Which source of `piece` is the base (None: the method has none, §19.2)."""
    if not METHODS[config.merge_method].uses_base:
        return None
    return next((k for k, s in enumerate(piece.sources) if s.model == piece.base_model), None)


def _check_inputs(config: MergeConfig) -> None:
    """The method's base and input-count contract, per slice (§18.6, §19.2)."""
    spec, method = METHODS[config.merge_method], config.merge_method
    for i, piece in enumerate(effective_slices(config)):
        where = "models" if config.models is not None else f"slices[{i}]"
        base = base_index(config, piece)
        if piece.base_model is None and spec.uses_base and method not in BASE_OPTIONAL:
            raise _fail(config.origin, where, f"merge_method {method} needs a base_model")
        if piece.base_model is not None and spec.uses_base and base is None:
            raise _fail(config.origin, where, f"the base model {piece.base_model} must be one of "
                        "the slice's sources")
        others = len(piece.sources) - (base is not None)
        low, high = spec.others
        if not low <= others <= (high if high is not None else others):
            wanted = f"exactly {low}" if low == high else f"at least {low}"
            role = "model(s) besides the base" if spec.uses_base else "input model(s)"
            raise _fail(config.origin, where, f"merge_method {method} takes {wanted} {role}, "
                        f"got {others}")
        if piece.base_model is not None and method in BASE_AVERAGED_IN:
            log.warning("%s: %s: %s averages the base_model %s in as one more input (as "
                        "mergekit does); drop base_model to average the other models only",
                        config.origin, where, method, piece.base_model)
        if base is not None and piece.sources[base].parameters:
            log.warning("%s: %s: the parameters of the base model %s have no effect with %s "
                        "(mergekit ignores them)", config.origin, where, piece.base_model, method)


def to_yaml(config: MergeConfig) -> str:
    """The config as mergekit YAML; load_config(to_yaml(c)) == c."""
    return yaml.safe_dump(config_doc(config), sort_keys=False, default_flow_style=None, width=100)


def config_doc(config: MergeConfig) -> dict[str, object]:
    """The config as the plain mapping to_yaml writes."""
    doc: dict[str, object] = {"merge_method": config.merge_method}
    if config.base_model is not None:
        doc["base_model"] = str(config.base_model)
    if config.models is not None:
        doc["models"] = [_source_doc(s) for s in config.models]
    else:
        doc["slices"] = [{"sources": [_source_doc(s) for s in piece.sources],
                          **({"base_model": str(piece.base_model)} if piece.base_model else {}),
                          **_params_doc(piece.parameters)} for piece in config.slices]
    doc.update(_params_doc(config.parameters))
    for key in ("dtype", "out_dtype"):
        if getattr(config, key) is not None:
            doc[key] = getattr(config, key)
    if config.pad_to_multiple_of is not None or config.tokens:
        block: dict[str, object] = {"source": str(config.tokenizer_source)}
        if config.tokens:
            block["tokens"] = {t: _token_doc(s) for t, s in config.tokens.items()}
        if config.pad_to_multiple_of is not None:
            block["pad_to_multiple_of"] = config.pad_to_multiple_of
        doc["tokenizer"] = block
    elif config.tokenizer_source is not None:
        doc["tokenizer_source"] = str(config.tokenizer_source)
    for key in ("vocab", "chat_template", "seed"):
        if getattr(config, key) is not None:
            doc[key] = getattr(config, key)
    return doc


def _token_doc(source: TokenSource) -> dict[str, object]:
    if source.model is None:
        doc: object = {"kind": "zero"}
    elif source.token is None:
        doc = str(source.model)
    else:
        key = "token" if isinstance(source.token, str) else "token_id"
        doc = {"kind": "model_token", "model": str(source.model), key: source.token}
    return {"source": doc, **({"force": True} if source.force else {})}


def _source_doc(source: Source) -> dict[str, object]:
    doc: dict[str, object] = {"model": str(source.model)}
    if source.layer_range is not None:
        doc["layer_range"] = list(source.layer_range)
    return {**doc, **_params_doc(source.parameters)}


def _params_doc(params: Params) -> dict[str, object]:
    return {"parameters": {k: _setting_doc(v) for k, v in params.items()}} if params else {}


def _setting_doc(setting: Setting | Gradient) -> object:
    if isinstance(setting, Gradient):
        return list(setting.values)
    if isinstance(setting, tuple):
        return [{**({"filter": r.filter} if r.filter is not None else {}),
                 "value": _setting_doc(r.value)} for r in setting]
    return setting
