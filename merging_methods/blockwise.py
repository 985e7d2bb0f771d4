"""The fast path of a per-element method: its dense function applied block by block.

When output entry j depends only on entry j of the inputs (nearswap, ram), the dense function
gives the same bits on any block of entries as on the whole tensor. So the runner may merge such
a method in row chunks, and within a chunk `per_element` runs it on cache-sized blocks read
through exact float32 upcasts of the stored (bf16/fp16) inputs, writing into the runner's
reused result buffer: no full-size float32 copy of any input is made.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from merging_methods.gta_blocked import output_buffer
from merging_methods.primitives import block_size, blocks


def per_element(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The FastPath form of the per-element method `fn`: same arguments plus `out`, same bits."""
    def fast(base: Tensor, others: list[Tensor], *, out: Tensor | None = None,
             **params) -> Tensor:
        flat, flats = base.reshape(-1), [other.reshape(-1) for other in others]
        result = output_buffer(base, out)
        for start, stop in blocks(flat.numel(), block_size(base.device)):
            result[start:stop] = fn(flat[start:stop].float(),
                                    [other[start:stop].float() for other in flats], **params)
        return result.view_as(base)

    fast.__doc__ = f"{fn.__name__}, block by block (bit-identical to it; blockwise.py)."
    return fast
