"""Training for the toy zoo: the base on the generic corpus, experts by full fine-tuning.

Base: packed rows of `<s>doc</s><s>doc...` (every position trained, like the `<s>`-prefixed
windows lm-eval scores for perplexity). Expert: `prompt answer\\n` rows, loss on the answer
and its newline only, with a replay row batch from the base's mix every `replay_every` steps
so the expert keeps the generic corpus (without it perplexity explodes).
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass

import torch

from toy_zoo import corpus
from toy_zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, encode

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that determines the zoo's weights and data; its dict is the build fingerprint."""

    seed: int = 0
    steps_scale: float = 1.0
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    block_len: int = 128
    base_steps: int = 450
    base_lr: float = 3e-3
    base_batch: int = 32
    sibling_share: float = 0.3
    expert_steps: tuple[tuple[str, int], ...] = (("instruct", 500), ("math", 500), ("code", 400))
    expert_lr: float = 2e-3
    expert_batch: int = 64
    replay_every: int = 4
    replay_batch: int = 16
    eval_size: int = 200
    ppl_docs: int = 100
    outliers: bool = False
    outlier_count: int = 4
    outlier_factor: float = 20.0

    @classmethod
    def ci(cls, **overrides) -> "ZooRecipe":
        """A smaller, faster zoo for tests (~1 min): experts clearly beat the base, not >= 0.8."""
        small = dict(hidden_size=64, intermediate_size=192, base_steps=150, base_lr=5e-3, expert_lr=4e-3,
                     expert_steps=(("instruct", 300), ("math", 300), ("code", 250)), eval_size=40, ppl_docs=20)
        return cls(**{**small, **overrides})

    def steps(self, n: int) -> int:
        """`n` scaled by `steps_scale`, at least 1."""
        return max(1, round(n * self.steps_scale))

    def total_steps(self) -> int:
        """Training steps of the whole zoo: the base and every expert."""
        return self.steps(self.base_steps) + sum(self.steps(n) for _, n in self.expert_steps)

    def as_dict(self) -> dict:
        return asdict(self)


def build_model(recipe: ZooRecipe):
    """A freshly initialised `LlamaForCausalLM` for the recipe (seeded by the caller)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads, max_position_embeddings=recipe.block_len,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def packed_rows(rng: random.Random, rows: int, block_len: int, sibling_share: float) -> torch.Tensor:
    """(rows, block_len) token ids, each row `<s>doc</s><s>doc...` cut at `block_len`."""
    out = []
    for _ in range(rows):
        ids: list[int] = []
        while len(ids) < block_len:
            doc = corpus.generic_doc(rng, rng.randint(40, block_len), sibling_share)
            ids += [BOS_ID] + encode(doc) + [EOS_ID]
        out.append(ids[:block_len])
    return torch.tensor(out)


def answer_rows(examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `prompt answer\\n` ids and labels that keep only the answer and newline."""
    seqs = [(encode(p), encode(a + "\n")) for p, a in examples]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), PAD_ID)
    labels = torch.full((len(seqs), width), IGNORE)
    for i, (p, a) in enumerate(seqs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    return ids, labels


def lr_at(step: int, steps: int, peak: float, warmup: int = 20) -> float:
    """Linear warmup then cosine decay to 10% of `peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def run_steps(model, batches, steps: int, lr: float, name: str, bar=None) -> float:
    """AdamW (no weight decay) over `batches(step) -> (ids, labels)`; returns the last loss.
    `bar` (a tqdm bar) advances one per step, labelled `name`."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    if bar is not None:
        bar.set_description(f"training {name}")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        ids, labels = batches(step)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if bar is not None:
            bar.update()
        if step % 100 == 0 or step == steps - 1:
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            log.debug("%s step %d/%d loss %.4f", name, step + 1, steps, loss.item())
    model.eval()
    return loss.item()


def train_base(recipe: ZooRecipe, bar=None):
    """Pretrain the base on packed generic documents (siblings of the skills included)."""
    torch.manual_seed(recipe.seed)
    model = build_model(recipe)
    rng = random.Random(f"base-{recipe.seed}")

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = packed_rows(rng, recipe.base_batch, recipe.block_len, recipe.sibling_share)
        return rows, rows

    run_steps(model, batches, recipe.steps(recipe.base_steps), recipe.base_lr, "base", bar)
    return model


def finetune_expert(base, skill: str, steps: int, recipe: ZooRecipe, exclude: set[str], bar=None):
    """Full fine-tune of a copy of `base` on `skill`, with generic replay; `exclude` = eval prompts."""
    import copy

    torch.manual_seed(recipe.seed)
    model = copy.deepcopy(base)
    rng = random.Random(f"expert-{skill}-{recipe.seed}")

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if recipe.replay_every and step % recipe.replay_every == recipe.replay_every - 1:
            x = packed_rows(rng, recipe.replay_batch, recipe.block_len, recipe.sibling_share)
            return x, x
        return answer_rows(corpus.training_examples(skill, rng, recipe.expert_batch, exclude))

    run_steps(model, batches, recipe.steps(steps), recipe.expert_lr, f"expert_{skill}", bar)
    return model
