"""Tiny, locally built Hugging Face checkpoints for tests: no downloads, seconds to build.

`build_tokenizer` trains a small byte-level BPE tokenizer with `tokenizers`; `build_llama`
saves a random `LlamaForCausalLM` (optionally bf16, tied, sharded, or as legacy .bin) together
with that tokenizer, so the folder looks like a real hub checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "Question: What is 2 + 3? Answer: 5",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n",
    "A B C D E F G",
    "#### 42",
    "Merging language models keeps the skills of several fine-tunes in one model.",
    "The quick brown fox jumps over the lazy dog.",
] * 10


def build_tokenizer(out_dir: Path, vocab_size: int = 300):
    """Train a byte-level BPE tokenizer on CORPUS and save it (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def llama_config(vocab_size: int, *, tie: bool = False, **overrides):
    """A ~30k-parameter Llama config (hidden 32, 2 layers, GQA) for fast tests."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_llama(
    out_dir: Path,
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    legacy_bin: bool = False,
    tokenizer_from: Path | None = None,
    **config_overrides,
) -> Path:
    """Save a random tiny Llama (+ tokenizer) to `out_dir` and return the folder.

    vocab_size defaults to the tokenizer's length; pass a larger one to model a fine-tune with an
    added pad row (e.g. 32001 vs 32000). `legacy_bin` writes `pytorch_model*.bin` shards instead
    of safetensors, like older hub checkpoints (WizardLM-13B ships that way).
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_from) if tokenizer_from else build_tokenizer(out_dir)
    if tokenizer_from:
        tok.save_pretrained(out_dir)
    cfg = llama_config(vocab_size or len(tok), tie=tie, **config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    if legacy_bin:
        _save_legacy_bin(model, out_dir, max_shard_size)
    else:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out_dir, **kwargs)
    return out_dir


def build_gemma3(out_dir: Path, *, seed: int = 0) -> Path:
    """Save a random tiny `Gemma3ForCausalLM` (+ tokenizer): tied, q/k norms, four norms per
    layer scaling by 1 + weight, one sliding-window and one full-attention layer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():   # Gemma initialises its norm weights to 0 (scale 1 + 0); vary them
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    return out_dir


def _save_legacy_bin(model, out_dir: Path, max_shard_size: str | None) -> None:
    """Write pytorch_model.bin (or two shards + index) the way transformers 4.x did."""
    model.config.save_pretrained(out_dir)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if not max_shard_size:
        torch.save(state, out_dir / "pytorch_model.bin")
        return
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, out_dir / fname)
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def build_finetune(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    scale: float = 0.02,
    extra_rows: int = 0,
    added_tokens: tuple[str, ...] = (),
    dtype: torch.dtype | None = None,
    max_shard_size: str | None = None,
    legacy_bin: bool = False,
) -> Path:
    """A 'fine-tune' of the model in base_dir: the base plus seeded noise of relative size `scale`.

    legacy_bin writes pytorch_model*.bin files (two shards when max_shard_size is given).
    extra_rows > 0 grows the vocabulary like an added pad token (32000 -> 32001) in both the
    embedding and the lm_head (and the config), as real instruction fine-tunes do;
    `added_tokens` also names them in the tokenizer (as special tokens, the last one the pad
    token) and adds one row each on top of `extra_rows`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    extra_rows += len(added_tokens)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale * param.std().clamp(min=1e-3))
        if extra_rows:
            model.resize_token_embeddings(model.config.vocab_size + extra_rows, mean_resizing=False)
            for matrix in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
                matrix[-extra_rows:] = torch.randn(extra_rows, matrix.shape[1], generator=gen) * 0.02
    if dtype is not None:
        model = model.to(dtype)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if legacy_bin:
        _save_legacy_bin(model, Path(out_dir), max_shard_size)
    else:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out_dir, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    for token in added_tokens:
        tokenizer.add_special_tokens({"pad_token": token})
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
