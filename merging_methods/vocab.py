"""`--vocab union`: align the vocabularies of the base and the fine-tunes (ALGORITHMS.md §13.1).

V0 = the base's vocab_size; Ai = fine-tune i's added tokens with id >= V0 (its "pad tokens").
The output vocabulary is V0 + |U| rows, U the union of the Ai in order of first appearance over
the fine-tunes in input order (deterministic, unlike the reference's set order). Each model keeps
its own rows and every missing row is the mean of that model's own rows (what the reference's
repeated `add_special_tokens` + resize does). Rows are aligned by position, not by token, as in
the reference. The output tokenizer is the base's with U appended as special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from checkpoints.checkpoint import load_tokenizer
from checkpoints.errors import UserError

FALLBACK = "use --vocab base to keep the base's vocabulary"


@dataclass(frozen=True)
class VocabUnion:
    tokens: tuple[str, ...]   # U: appended to the base tokenizer at ids V0, V0+1, ...
    rows: int                 # output rows, V0 + |U|
    notes: tuple[str, ...]    # one line per model that gains mean rows


def _load_tokenizer(folder: Path, label: str):
    return load_tokenizer(folder, label, "--vocab union", f"; {FALLBACK}")


def _added_at_or_above(tokenizer, first_id: int) -> list[str]:
    """The tokenizer's added tokens with id >= first_id, by id."""
    return [t.content for i, t in sorted(tokenizer.added_tokens_decoder.items()) if i >= first_id]


def plan_union(base_dir: Path, base_rows: int,
               finetunes: list[tuple[str, Path, int]]) -> VocabUnion:
    """Steps 1-4 of §13.1 from the tokenizers and row counts (label, folder, rows per fine-tune)."""
    base_tok = _load_tokenizer(base_dir, "the base model")
    if _added_at_or_above(base_tok, base_rows):
        raise UserError(f"--vocab union: the base tokenizer has added tokens at ids >= its vocab "
                        f"size {base_rows}; {FALLBACK}")
    if len(base_tok) != base_rows:
        raise UserError(f"--vocab union: the base tokenizer has {len(base_tok)} tokens but the "
                        f"embedding {base_rows} rows, so new tokens cannot take ids {base_rows}+; "
                        f"{FALLBACK}")
    owned: list[list[str]] = []
    for label, folder, rows in finetunes:
        extra = rows - base_rows
        added = _added_at_or_above(_load_tokenizer(folder, label), base_rows)
        if extra < 0:
            raise UserError(f"--vocab union: {label} has {rows} vocabulary rows, fewer than the "
                            f"base's {base_rows}; {FALLBACK}")
        if extra > len(added):
            raise UserError(f"--vocab union: {label} has {extra} rows beyond the base vocabulary "
                            f"but its tokenizer names only {len(added)} tokens there; {FALLBACK}")
        owned.append(added[:extra])   # a tokenizer naming more tokens than rows loses the surplus
    union = tuple(dict.fromkeys(t for tokens in owned for t in tokens))
    base_vocab = base_tok.get_vocab()
    clash = [t for t in union if t in base_vocab]
    if clash:
        raise UserError(f"--vocab union: token {clash[0]!r} added by a fine-tune is already in the "
                        f"base vocabulary at id {base_vocab[clash[0]]}; {FALLBACK}")
    notes = [f"vocab union: {len(union)} added token(s) {list(union)}; the base gains "
             f"{len(union)} mean row(s)"] if union else []
    for (label, _, rows), tokens in zip(finetunes, owned):
        if len(union) - len(tokens):
            notes.append(f"vocab union: {label} gains {len(union) - len(tokens)} mean row(s) "
                         f"after its {rows} rows")
    return VocabUnion(union, base_rows + len(union), tuple(notes))


def save_union_tokenizer(base_dir: Path, union: VocabUnion, out_dir: Path) -> None:
    """The base tokenizer with U appended (each as the pad token, like the reference), saved."""
    tokenizer = _load_tokenizer(base_dir, "the base model")
    for token in union.tokens:
        tokenizer.add_special_tokens({"pad_token": token})
    ids = tokenizer.convert_tokens_to_ids(list(union.tokens))
    expected = list(range(union.rows - len(union.tokens), union.rows))
    if ids != expected:
        raise UserError(f"--vocab union: the base tokenizer gave the added tokens ids {ids}, not "
                        f"{expected}; {FALLBACK}")
    tokenizer.save_pretrained(out_dir)


def vocab_config_update(config: dict, rows: int) -> dict:
    """config.json keys to set so the config declares `rows` tokens (top level or text_config)."""
    if "vocab_size" in config or not isinstance(config.get("text_config"), dict):
        return {"vocab_size": rows}
    return {"text_config": {**config["text_config"], "vocab_size": rows}}
