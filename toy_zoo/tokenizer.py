"""A character-level tokenizer for the toy zoo: one token per printable ASCII character.

It is a `tokenizers` BPE model with a fixed vocabulary and no merges (so every character is
one token), a `Fuse` decoder (so decoding does not put spaces between characters) and no
post-processor (so no BOS is ever added). Saved with `tokenizer_class: PreTrainedTokenizerFast`,
which both transformers 4 and 5 load with `AutoTokenizer`.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


def encode(text: str) -> list[int]:
    """Token ids of `text`, exactly as the saved tokenizer encodes it (unknown chars -> <unk>)."""
    return [VOCAB.get(ch, UNK_ID) for ch in text]


def build_tokenizer():
    """The zoo's tokenizer as a `PreTrainedTokenizerFast` (pad, bos, eos, unk set)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab=dict(VOCAB), merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tokenizer(out_dir: Path, model_max_length: int) -> None:
    """Write the tokenizer files to `out_dir`, loadable by transformers 4 and 5."""
    tok = build_tokenizer()
    tok.model_max_length = model_max_length
    tok.save_pretrained(out_dir)
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # v5 writes TokenizersBackend, unknown to v4
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
