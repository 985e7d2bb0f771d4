"""Preflight: check every input checkpoint from its headers and plan the per-tensor merge.

Nothing here reads tensor data. The plan says, for every output tensor, where each model's
tensor comes from (its own name, or its input embedding when a fine-tune ties its lm_head)
and how many vocabulary rows the output has (ALGORITHMS.md §13.3): the base's (`--vocab base`:
extra rows are dropped, missing rows are taken from the base so they add no delta) or the
union's (`--vocab union`, planned in vocab.py). checkpoints.rows fits each model's rows.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from checkpoints.checkpoint import HEAD_SUFFIXES, CheckpointReader, TensorInfo
from checkpoints.errors import UserError

log = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")  # model.layers.N., transformer.h.N.


@dataclass(frozen=True)
class TensorPlan:
    name: str
    out: TensorInfo                   # output shape and dtype
    merge: bool                       # floating tensor merged; else copied from the base
    sources: tuple[str, ...]          # per model: the tensor name to read
    is_vocab: bool = False            # rows indexed by token id (embedding or lm_head)
    is_input_embedding: bool = False
    layer_index: int | None = None    # N of a tensor in decoder layer N


@dataclass
class MergePlan:
    tensors: list[TensorPlan]
    notes: list[str] = field(default_factory=list)   # one-line summaries shown to the user
    num_layers: int | None = None                    # the base config's decoder layers

    @property
    def out_infos(self) -> dict[str, TensorInfo]:
        return {t.name: t.out for t in self.tensors}


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (from `.layers.N.` or `.h.N.` in its name)."""
    match = _LAYER.search(name)
    return int(match[1]) if match else None


def num_layers(config: dict) -> int | None:
    """Decoder layers declared in a config.json (top level or text_config)."""
    for cfg in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return None


def _is_head(name: str) -> bool:
    return name.endswith(HEAD_SUFFIXES)


def input_embedding_name(reader: CheckpointReader) -> str | None:
    """The input-embedding tensor: a 2-D tensor with vocab_size rows that is not an output head."""
    vocab = reader.vocab_size
    candidates = [n for n, i in reader.info.items()
                  if len(i.shape) == 2 and not _is_head(n) and (vocab is None or i.shape[0] == vocab)]
    named = [n for n in candidates if "embed" in n or n.endswith("wte.weight")]
    return (named or candidates or [None])[0]


def input_embedding_rows(reader: CheckpointReader) -> int | None:
    """Rows of the model's input embedding (its vocabulary size in the weights), if it has one."""
    name = input_embedding_name(reader)
    return reader.info[name].shape[0] if name else None


def _is_vocab_tensor(name: str, base: CheckpointReader, embed_name: str | None) -> bool:
    shape = base.info[name].shape
    return len(shape) == 2 and (name == embed_name or _is_head(name)) and (
        base.vocab_size is None or shape[0] == base.vocab_size)


def build_plan(base: CheckpointReader, models: list[CheckpointReader],
               out_dtype: torch.dtype, vocab_rows: int | None = None,
               by_token: bool = False) -> MergePlan:
    """Compare key sets and shapes of all inputs with the base; one UserError lists problems.

    `vocab_rows` (`--vocab union`, a config's tokenizer vocabulary) is the output's vocabulary
    size; None keeps the base's. `by_token`: vocab rows are re-indexed by token (token_vocab.py),
    so a model's vocab tensors may have any number of rows."""
    embed_name = input_embedding_name(base)
    problems: list[str] = []
    notes: list[str] = []
    tensors: list[TensorPlan] = []
    cropped: dict[str, list[str]] = {}

    for model in models:
        extra = sorted(set(model.info) - set(base.info))
        ignorable = [n for n in extra if _is_head(n) and base.tie_word_embeddings]
        if ignorable:
            notes.append(f"{model.label} has an untied {ignorable[0]} but the base ties its "
                         "embeddings: the output stays tied and that head is not merged")
        extra = [n for n in extra if n not in ignorable]
        if extra:
            problems.append(f"{model.label} has {len(extra)} tensors the base lacks "
                            f"(e.g. {extra[0]})")

    for name, info in base.info.items():
        is_vocab = _is_vocab_tensor(name, base, embed_name)
        sources: list[str] = []
        for model in models:
            source = name
            if name not in model.info:
                tied_embed = input_embedding_name(model)
                if _is_head(name) and model.tie_word_embeddings and tied_embed:
                    source = tied_embed   # a tied fine-tune's head is its input embedding
                else:
                    problems.append(f"{model.label} lacks tensor {name}")
                    continue
            other = model.info[source]
            if other.shape != info.shape:
                same_width = other.shape[1:] == info.shape[1:]
                if is_vocab and same_width and vocab_rows is None:
                    cropped.setdefault(model.label, []).append(f"{other.shape[0]}->{info.shape[0]}")
                elif not (is_vocab and same_width and (by_token or other.shape[0] <= vocab_rows)):
                    problems.append(f"{name}: {model.label} has shape {list(other.shape)}, the "
                                    f"base {list(info.shape)}")
            sources.append(source)
        floating = info.dtype.is_floating_point
        shape = (vocab_rows, *info.shape[1:]) if is_vocab and vocab_rows else info.shape
        out = TensorInfo(shape, out_dtype if floating else info.dtype)
        tensors.append(TensorPlan(name, out, floating, tuple(sources), is_vocab,
                                  name == embed_name, layer_index(name)))

    if problems:
        shown = "; ".join(problems[:4])
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise UserError(f"the checkpoints do not match the base model: {shown}{more}; merge "
                        "only fine-tunes of the same base architecture")
    for label, changes in cropped.items():
        notes.append(f"vocab: {label} rows {', '.join(sorted(set(changes)))} aligned to the "
                     "base vocabulary (extra rows dropped, missing rows take the base's)")
    return MergePlan(tensors, notes, num_layers(base.config))

