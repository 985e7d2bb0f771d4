"""Full fine-tuning of the SmolLM2 base into one expert, on CPU, resumable.

Each example is the chat-templated question followed by the reference answer and `<|im_end|>`;
the loss covers the answer and that end token only (plus, with `replay_rows`, the plain language
model loss of a few prose chunks per step, which keeps general language), and the output layer (49,152 x 576, tied to
the embedding) is applied at those positions alone, which makes a step ~1.6x cheaper than
computing logits everywhere. AdamW (fp32, no weight decay), linear warm-up then cosine decay
(`toy_zoo.train.lr_at`), gradient clipping at 1. Matmuls run in bf16 under autocast while the
weights and optimizer state stay fp32: on this project's AVX512-BF16 CPUs a step is ~4x faster
(bf16 matmuls ~6x), and the fp32 master weights keep deltas far below bf16's step. A checkpoint (weights, optimizer, step) is
written every `checkpoint_every` steps, so a killed build resumes at the last one; the example
stream is fixed by the seed, so a resumed run sees the same examples as an uninterrupted one.
"""
from __future__ import annotations

import itertools
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from toy_zoo.train import lr_at

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class FinetuneRecipe:
    """What determines an expert's weights, given the base and its example stream."""

    steps: int
    lr: float
    batch: int = 16
    replay_rows: int = 0        # prose chunks per step, trained with the plain LM loss
    warmup: int = 10
    seed: int = 0
    bf16_autocast: bool = True  # matmuls in bf16, weights and optimizer in fp32 (~4x faster here)

    def as_dict(self) -> dict:
        return asdict(self)


def chat_prompt(tokenizer, question: str) -> str:
    """The question as the model's chat template renders a user turn, ready for the answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)


def qa_row(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """(ids, labels) of the templated question + answer + end of turn; the answer is labelled."""
    prompt = tokenizer(chat_prompt(tokenizer, example["question"]), add_special_tokens=False).input_ids
    answer = tokenizer(example["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def prose_chunks(tokenizer, texts: list[str], length: int) -> list[list[int]]:
    """The texts tokenized, joined by end-of-text tokens and cut into `length`-token chunks."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels of (ids, labels) rows."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        mask[i, :len(row_ids)] = 1
        labels[i, :len(row_ids)] = torch.tensor(row_labels)
    return ids, mask, labels


def token_losses(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every labelled token and its row index; logits only where labelled."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(targets)[keep]
    return F.cross_entropy(logits.float(), targets[keep], reduction="none"), rows


def step_loss(model, tokenizer, examples: list[dict], replay: list[list[int]]) -> torch.Tensor:
    """Mean answer loss of `examples` plus mean language-model loss of the `replay` chunks."""
    rows = [qa_row(tokenizer, ex) for ex in examples] + [(c, c) for c in replay]
    losses, row = token_losses(model, *pad_rows(rows, tokenizer.pad_token_id))
    is_replay = row >= len(examples)
    loss = losses[~is_replay].mean()
    return loss + losses[is_replay].mean() if replay else loss


def _save_checkpoint(path: Path, model, opt, step: int, recipe: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "recipe": recipe}, tmp)
    tmp.replace(path)


def finetune(model, tokenizer, stream: Iterator[dict], recipe: FinetuneRecipe, checkpoint: Path,
             replay: list[list[int]] = (), checkpoint_every: int = 25, name: str = "expert", position: int = 0,
             on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `model` in place for `recipe.steps` steps; returns the loss of every step run now.

    Resumes from `checkpoint` when it exists (skipping the examples already consumed) and
    deletes it when training finishes.
    """
    torch.manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = 0
    state = torch.load(checkpoint, weights_only=True) if checkpoint.is_file() else None
    if state is not None and state.get("recipe") != recipe.as_dict():
        log.info("%s: %s was written for another recipe; starting over", name, checkpoint)
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log.info("%s: resuming at step %d from %s", name, start, checkpoint)
    stream = itertools.islice(stream, start * recipe.batch, None)
    model.train()
    losses = []
    bar = tqdm(range(start, recipe.steps), desc=f"fine-tune {name}", initial=start, total=recipe.steps,
               unit="step", position=position)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.steps, recipe.lr, recipe.warmup)
        examples = list(itertools.islice(stream, recipe.batch))
        chunks = random.Random(f"replay-{recipe.seed}-{step}").sample(replay, recipe.replay_rows) if replay else []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16_autocast):
            loss = step_loss(model, tokenizer, examples, chunks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < recipe.steps:
            _save_checkpoint(checkpoint, model, opt, step + 1, recipe.as_dict())
        if on_step is not None:  # after the checkpoint: a step it reports is durable
            on_step(step + 1, losses[-1])
    model.eval()
    checkpoint.unlink(missing_ok=True)
    return losses
