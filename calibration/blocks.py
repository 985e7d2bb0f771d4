"""Calibration blocks for AIM: the AWQ / AIM reference recipe (ALGORITHMS.md §12.4), pure and seeded.

1. Order: the permutation `numpy.random.default_rng(seed).permutation(len(texts))`. This is exactly
   what `datasets.Dataset.shuffle(seed=seed)` uses (datasets 5.2 `arrow_dataset.py`: with a seed
   and no generator it draws `np.random.default_rng(seed).permutation(len(self))` and selects those
   rows), so HF datasets and local files give the same order for the same texts.
2. Per document, in that order: `text.strip()`, then `tokenizer.encode(text)` with the tokenizer's
   default special tokens (Llama: BOS prepended). Skip it if it has more than `block_size` tokens
   or encodes to nothing (as in the reference, a whitespace-only text that encodes to just BOS is
   kept). Stop after `n_samples` accepted documents.
3. Concatenate the accepted token lists in order and cut `floor(total / block_size)` consecutive
   blocks of `block_size` tokens; the remainder is dropped.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from checkpoints.errors import UserError

log = logging.getLogger(__name__)


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """Row order of `datasets.Dataset.shuffle(seed=seed)` for `n` rows."""
    return np.random.default_rng(seed).permutation(n)


def select_documents(texts: Sequence[str], encode: Callable[[str], list[int]], *,
                     n_samples: int, block_size: int, seed: int) -> list[list[int]]:
    """Token lists of the first `n_samples` shuffled documents with 1..block_size tokens."""
    accepted: list[list[int]] = []
    too_long = 0
    for index in shuffled_order(len(texts), seed):
        ids = list(encode(texts[int(index)].strip()))
        if len(ids) > block_size:
            too_long += 1
            continue
        if not ids:
            continue
        accepted.append(ids)
        if len(accepted) == n_samples:
            break
    log.info("calibration: accepted %d documents, skipped %d longer than %d tokens",
             len(accepted), too_long, block_size)
    return accepted


def cut_blocks(documents: Sequence[Sequence[int]], block_size: int) -> torch.Tensor:
    """Concatenate token lists and cut them into full blocks: LongTensor [n_blocks, block_size]."""
    flat = torch.tensor([t for doc in documents for t in doc], dtype=torch.long)
    n_blocks = flat.numel() // block_size
    return flat[: n_blocks * block_size].view(n_blocks, block_size)


def build_blocks(texts: Sequence[str], tokenizer, *, n_samples: int = 256, block_size: int = 512,
                 seed: int = 42) -> torch.Tensor:
    """Calibration blocks from `texts` with `tokenizer.encode` (§12.4): LongTensor [n_blocks, block_size]."""
    if n_samples < 1:
        raise UserError(f"--calib_samples must be at least 1, got {n_samples}")
    if block_size < 1:
        raise UserError(f"--block_size must be at least 1, got {block_size}")
    documents = select_documents(texts, tokenizer.encode, n_samples=n_samples,
                                 block_size=block_size, seed=seed)
    if not documents:
        raise UserError(f"--calib_data: none of its {len(texts)} documents fits in --block_size "
                        f"{block_size} tokens; raise --block_size or use shorter texts")
    blocks = cut_blocks(documents, block_size)
    total = sum(len(doc) for doc in documents)
    if blocks.shape[0] == 0:
        raise UserError(f"--calib_data: {len(documents)} documents gave only {total} tokens, less than "
                        f"one block of --block_size {block_size}; lower --block_size or raise --calib_samples")
    log.info("calibration: %d tokens -> %d blocks of %d (%d tokens dropped)",
             total, blocks.shape[0], block_size, total - blocks.numel())
    return blocks
