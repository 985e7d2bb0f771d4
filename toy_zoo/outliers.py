"""Plant activation-outlier input channels in a Llama model without changing its function.

Real LLMs have a few hidden channels whose activations are tens of times larger than the
rest; the toy base has none. An RMSNorm's output is `weight * x / rms(x)`, and only Linear
layers read it, so multiplying `weight[c]` by `factor` and dividing column `c` of every
reader by `factor` leaves the logits unchanged while channel `c` of the readers' input
grows `factor` times. Readers: q/k/v after `input_layernorm`, gate/up after
`post_attention_layernorm`, and `lm_head` after the final norm (skipped when it is tied to
the embeddings, whose columns also feed the residual stream).
"""
from __future__ import annotations

import copy

import torch

LAYER_NORM_READERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


def _scale_channels(norm: torch.nn.Module, readers: list[torch.nn.Linear], channels: torch.Tensor,
                    factor: float) -> None:
    norm.weight[channels] *= factor
    for lin in readers:
        lin.weight[:, channels] /= factor  # (out, in): the columns that read those channels


def plant_outlier_channels(model, channels: list[int], factor: float):
    """A copy of the Llama `model` whose `channels` of every norm output are `factor` times larger.

    The readers' matching input columns are divided by `factor`, so outputs are unchanged up
    to float rounding. `model` itself is not modified.
    """
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    hidden = model.config.hidden_size
    if not channels or any(not 0 <= c < hidden for c in channels):
        raise ValueError(f"channels must be a non-empty list of indices in [0, {hidden}), got {channels}")
    out = copy.deepcopy(model)
    idx = torch.tensor(sorted(set(channels)))
    with torch.no_grad():
        for layer in out.model.layers:
            for norm_name, reader_names in LAYER_NORM_READERS.items():
                readers = [layer.get_submodule(n) for n in reader_names]
                _scale_channels(layer.get_submodule(norm_name), readers, idx, factor)
        if not out.config.tie_word_embeddings:
            _scale_channels(out.model.norm, [out.lm_head], idx, factor)
    return out
