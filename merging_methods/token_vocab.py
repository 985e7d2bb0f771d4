"""mergekit's vocabulary building: `tokenizer_source: union | <model>` (ALGORITHMS.md §18.8).

The output vocabulary is a tokenizer's: the union of every input's tokens, or a named model's
tokenizer as it is. Every embedding and output head is re-indexed by token before the merge:
a model that has a token gives its own row; a model that lacks it gets, in this order, the only
holder's row, zeros when no input has the token, the base's row when the base has it, else the
mean of the holders' rows (mergekit 0.1.5's `PermutedVocabulary`). `tokenizer.tokens` adds
tokens and names where a token's row comes from instead (a model's own row of it or of another
of its tokens, or zeros; `force` gives that row to every model, holders too).
`pad_to_multiple_of` rounds the rows up; each model's padding rows are the mean of its
re-indexed rows. This is not
§13.1's pad-token union (`--vocab union`, vocab.py): rows here are aligned by token, not by
position.

Also the output's `chat_template:` (auto: the models' most common template, or a Jinja text).

Deterministic where mergekit is not: models are taken in document order (mergekit: a set) and
each tokenizer's tokens in id order (mergekit: a hash map's order).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Mapping, Sequence

import torch

from checkpoints.checkpoint import (CheckpointReader, has_tokenizer, load_tokenizer,
                                    resolve_model_dir)
from checkpoints.errors import UserError, writing
from merging_methods.mergekit_config import MergeConfig, ModelRef, TokenSource
from merging_methods.plan import input_embedding_rows

log = logging.getLogger(__name__)

ZERO, MEAN, OWN = -1, -2, -3   # fill codes besides a model index: see `fill_sources`
WHERE = "tokenizer_source"     # the config key named in errors


def own_vocab(tokenizer, rows: int) -> dict[str, int]:
    """token -> id for the tokens that have a row (id < rows), in id order."""
    return dict(sorted(((t, i) for t, i in tokenizer.get_vocab().items() if i < rows),
                       key=lambda item: item[1]))


def union_tokenizer(base_folder: Path, tokenizers: Sequence[tuple[object, int]]):
    """The base's tokenizer (reloaded, so the caller's is untouched) plus, in order, every other
    token of `tokenizers` [(tokenizer, its rows)], base first: plain tokens by id, then added
    tokens with the settings of their first holder."""
    out = load_tokenizer(base_folder, "the base model", WHERE)
    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for tokenizer, rows in tokenizers:
        decoder = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i < rows}
        names = {t.content for t in decoder.values()}
        plain.update(dict.fromkeys(t for t in own_vocab(tokenizer, rows) if t not in names))
        for token in decoder.values():
            added.setdefault(token.content, token)
    base_vocab = out.get_vocab()
    out.add_tokens([t for t in plain if t not in added and t not in base_vocab])
    out.add_tokens(list(added.values()))   # one call each: a union of two large vocabularies
    return out


def fill_sources(index: torch.Tensor, base: int | None) -> torch.Tensor:
    """For each output token (a column of `index`, (models, V): each model's row or -1), what a
    model lacking it gets: OWN (every model has it), a model index (its only holder, or the base
    when the base has it), ZERO (nobody has it) or MEAN (the holders' mean row)."""
    holds = index >= 0                                             # (models, V)
    count = holds.sum(0)
    fill = torch.full_like(count, MEAN)
    if base is not None:
        fill = torch.where(holds[base], base, fill)
    fill = torch.where(count == 0, ZERO, fill)
    fill = torch.where(count == 1, holds.int().argmax(0), fill)
    return torch.where(count == len(index), OWN, fill)


def align_rows(tensors: Sequence[torch.Tensor], index: torch.Tensor, fill: torch.Tensor,
               rows: int, fill_row: torch.Tensor | None = None,
               force: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each model's tensor re-indexed to the output vocabulary (`rows` rows, V = index.shape[1]
    of them tokens), in the inputs' promoted dtype; rows per `fill_sources`. A mean is summed
    model by model in that dtype and divided once, as mergekit does. `fill_row` (V,): the row of
    model `fill` to fill with (default: its own row of that token); `force` (V,) bool: every model
    takes the fill row, holders too."""
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    n_vocab, width = index.shape[1], tensors[0].shape[1:]
    if fill_row is None:
        fill_row = index.gather(0, fill.clamp(min=0).view(1, -1)).view(-1)
    default = torch.zeros((n_vocab, *width), dtype=dtype)
    for k, tensor in enumerate(tensors):
        take = fill == k
        default[take] = tensor[fill_row[take]].to(dtype)
    mean = fill == MEAN
    if mean.any():
        total = torch.zeros((int(mean.sum()), *width), dtype=dtype)
        for k, tensor in enumerate(tensors):
            own = index[k][mean]
            total += torch.where((own >= 0).view(-1, *[1] * len(width)),
                                 tensor[own.clamp(min=0)].to(dtype), 0)
        count = (index[:, mean] >= 0).sum(0).view(-1, *[1] * len(width))
        default[mean] = total / count
    out = []
    for k, tensor in enumerate(tensors):
        has = index[k] >= 0 if force is None else (index[k] >= 0) & ~force
        has = has.view(-1, *[1] * len(width))
        aligned = torch.where(has, tensor[index[k].clamp(min=0)].to(dtype), default)
        if rows > n_vocab:   # padding rows: this model's mean re-indexed row
            aligned = torch.cat([aligned, aligned.mean(0, keepdim=True).expand(
                rows - n_vocab, *width)])
        out.append(aligned)
    return out


Override = tuple[int, "str | None", int, bool]
"""A tokenizer.tokens entry resolved: (its token id, the model whose row it takes, None for
zeros; that model's row; force)."""


@dataclass(frozen=True)
class TokenRows:
    """The output vocabulary and every referenced model's row of each of its tokens. Which row a
    model lacking a token gets depends on the inputs of each tensor, so it is decided there."""

    tokenizer: object                  # the output tokenizer, saved with the merge
    rows: int                          # output rows: the tokens, rounded up to a multiple
    labels: tuple[str, ...]            # every model the config reads, in the order of `index`
    index: torch.Tensor                # (models, V) int64: the model's row of token id, or -1
    base: str | None                   # the base's label: its row goes to models lacking a token
    overrides: Mapping[str, Override]  # tokenizer.tokens, by token

    def align(self, tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> list[torch.Tensor]:
        """`tensors` (one output tensor's inputs, one per label, any of them repeated)
        re-indexed to the output rows."""
        inputs = list(dict.fromkeys(labels))
        by_label = dict(zip(labels, tensors))
        index = self.index[[self.labels.index(label) for label in inputs]]
        fill = fill_sources(index, inputs.index(self.base) if self.base in inputs else None)
        fill_row = index.gather(0, fill.clamp(min=0).view(1, -1)).view(-1)
        force = torch.zeros(index.shape[1], dtype=torch.bool)
        for token, (t, label, row, forced) in self.overrides.items():
            if label is not None and label not in inputs:
                raise UserError(f"tokenizer.tokens.{token}: {label} is not an input of this "
                                "tensor, so its row cannot be taken")
            fill[t] = ZERO if label is None else inputs.index(label)
            fill_row[t], force[t] = row, forced
        aligned = dict(zip(inputs, align_rows([by_label[m] for m in inputs], index, fill,
                                              self.rows, fill_row, force)))
        return [aligned[label] for label in labels]


def token_rows(tokenizer, vocabs: Sequence[dict[str, int]], labels: Sequence[str],
               base: str | None, pad_to_multiple_of: int | None,
               tokens: Mapping[str, TokenSource] | None = None) -> TokenRows:
    """Plan the re-indexing from the output tokenizer and each model's own vocabulary (`vocabs`,
    token -> row), with the `tokens` of tokenizer.tokens (their texts resolved to rows)."""
    vocab = tokenizer.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise UserError(f"{WHERE}: the output tokenizer's ids are not 0..N-1; this "
                        "vocabulary cannot index embedding rows")
    tokens_by_id = sorted(vocab, key=vocab.get)
    index = torch.tensor([[own.get(t, -1) for t in tokens_by_id] for own in vocabs],
                         dtype=torch.long)
    rows = len(tokens_by_id)
    if pad_to_multiple_of:
        rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
    overrides = {}
    for token, given in (tokens or {}).items():
        label, row = None if given.model is None else str(given.model), given.token
        if label is not None and row is None:
            row = int(index[labels.index(label), vocab[token]])
            if row < 0:
                raise UserError(f"tokenizer.tokens.{token}: {label} has no row for {token!r}; "
                                "name one of its tokens (kind: model_token)")
        overrides[token] = (vocab[token], label, row or 0, given.force)
    nowhere = (index < 0).all(0)
    nowhere[[t for t, *_ in overrides.values()]] = False
    if nowhere.any():
        log.warning("%s: %d output token(s) are in no input model (e.g. %r); their rows are "
                    "zeros", WHERE, int(nowhere.sum()), tokens_by_id[int(nowhere.nonzero()[0])])
    return TokenRows(tokenizer, rows, tuple(labels), index, base, overrides)


def reindexes(config: MergeConfig | None) -> bool:
    """Whether a config's vocabulary is built from tokenizers (union, a model, padded, or with
    per-token sources)."""
    return config is not None and (
        config.tokenizer_source == "union" or isinstance(config.tokenizer_source, ModelRef)
        or config.pad_to_multiple_of is not None or bool(config.tokens))


def plan_token_rows(config: MergeConfig, donor: CheckpointReader,
                    readers: Sequence[CheckpointReader]) -> TokenRows:
    """The output vocabulary of `config` and every input's rows in it, from tokenizers and
    headers only. `donor` is the base (else the first model): its tokenizer is the union's
    start. A model whose tokenizer does not load is taken to share the donor's, as in mergekit."""
    by_label = {r.label: r for r in (donor, *readers)}
    labels = list(by_label)   # the donor first, then document order
    rows = {label: r.vocab_size or input_embedding_rows(r) or 0 for label, r in by_label.items()}
    donor_tok = load_tokenizer(donor.folder, donor.label, WHERE)

    def tokenizer_of(label: str):
        if label == donor.label:
            return donor_tok
        try:
            return load_tokenizer(by_label[label].folder, label, WHERE)
        except UserError as err:
            log.warning("%s; taking it to be the base's, as mergekit does", err)
            return donor_tok

    tokenizers = {label: tokenizer_of(label) for label in labels}
    source = config.tokenizer_source
    if source in ("union", "base") and max(donor_tok.get_vocab().values()) >= rows[donor.label]:
        raise UserError(f"{WHERE}: the tokenizer of {donor.label} names ids beyond its "
                        f"{rows[donor.label]} embedding rows; give a model source instead")
    if source == "union":
        others = [(tokenizers[label], rows[label]) for label in labels if label != donor.label]
        out = union_tokenizer(donor.folder, [(donor_tok, rows[donor.label]), *others])
    elif source == "base":
        out = load_tokenizer(donor.folder, donor.label, WHERE)   # a copy: tokens may be added
    else:
        out = load_tokenizer(resolve_model_dir(str(source), WHERE), str(source), WHERE)
    for token in config.tokens:
        if token not in out.get_vocab():
            out.add_tokens(token)
    tokens = {token: _token_row(token, given, tokenizers, rows)
              for token, given in config.tokens.items()}
    return token_rows(out, [own_vocab(tokenizers[label], rows[label]) for label in labels],
                      labels, None if config.base_model is None else str(config.base_model),
                      config.pad_to_multiple_of, tokens)


def _token_row(token: str, given: TokenSource, tokenizers: Mapping[str, object],
               rows: Mapping[str, int]) -> TokenSource:
    """A tokenizer.tokens entry with its model checked and a token text turned into its row."""
    if given.model is None:
        return given
    label = str(given.model)
    if label not in tokenizers:
        raise UserError(f"tokenizer.tokens.{token}: {label} is not one of the merged models")
    row = given.token
    if isinstance(row, str):
        row = tokenizers[label].get_vocab().get(row)
    if given.token is not None and (row is None or row >= rows[label]):
        raise UserError(f"tokenizer.tokens.{token}: {label} has no row for token "
                        f"{given.token!r}")
    return TokenSource(given.model, row, given.force)


def chosen_chat_template(setting: str, folders: Sequence[Path]) -> str | None:
    """The template `chat_template:` gives: the Jinja text itself, or for `auto` the most common
    template among the models' tokenizers (ties: the first in document order, where mergekit's
    order varies between runs); None when no model has one."""
    if setting != "auto":
        return setting
    found = []
    for folder in dict.fromkeys(folders):
        try:
            template = load_tokenizer(folder, str(folder), "chat_template").chat_template
        except UserError as err:
            log.warning("%s; it takes no part in chat_template: auto", err)
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def save_chat_template(out_dir: Path, setting: str, folders: Sequence[Path]) -> None:
    """Set the output tokenizer's chat template per `chat_template:` (models in `folders`)."""
    template = chosen_chat_template(setting, folders)
    if template is None or not has_tokenizer(out_dir):
        log.warning("chat_template: %s; the output keeps the donor's", "no input model has a "
                    "template" if template is None else "the output has no tokenizer")
        return
    tokenizer = load_tokenizer(out_dir, "the output", "chat_template")
    tokenizer.chat_template = template
    with writing(out_dir / "tokenizer_config.json"):
        tokenizer.save_pretrained(out_dir)
