"""Attention over each session's sink cache, plugged into `transformers`.

The model runs on a packed batch: the new tokens of every session in this
step, one after another in a single row. Its projections, norms and MLPs run
once over all of them; this attention function splits the row back into
sessions and attends each one against its own cache with its own in-cache
positions. The model is called with every position id set to zero, so its
own rotary embedding is the identity and the keys it hands over are
unrotated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from worker.rotary import RotaryTables
from worker.sink_cache import SinkCache

ATTENTION_NAME = "sinkserve"


@dataclass
class Segment:
    """The new tokens of one session in a packed step."""

    cache: SinkCache
    token_ids: list[int]
    offset: int  # first index of this segment in the packed row
    start: int  # first slot (and position) these tokens take in the cache

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class PackedStep:
    """Everything the attention function needs for one forward pass."""

    segments: list[Segment]
    rotary: RotaryTables


def sink_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    packed_step: PackedStep | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, KVH, T, D] -> output [1, T, H, D]."""
    if packed_step is None:
        raise RuntimeError("sinkserve attention called without a packed step")
    layer = module.layer_idx
    outputs = []
    for segment in packed_step.segments:
        rows = slice(segment.offset, segment.offset + segment.num_tokens)
        keys, values = segment.cache.write(
            layer, segment.start, key[0, :, rows], value[0, :, rows]
        )  # [KVH, S, D] each
        end = segment.start + segment.num_tokens
        positions = segment.cache.slot_positions(segment.start, end)
        q = packed_step.rotary.rotate(query[0, :, rows], positions)  # [H, t, D]
        mask = _causal_mask(segment, keys.shape[1], query.device)
        out = F.scaled_dot_product_attention(
            q[None],
            keys[None],
            values[None],
            attn_mask=mask,
            scale=scaling,
            enable_gqa=True,
        )  # [1, H, t, D]
        outputs.append(out)
    output = torch.cat(outputs, dim=2)  # [1, H, T, D]
    return output.transpose(1, 2).contiguous(), None


def _causal_mask(
    segment: Segment, num_keys: int, device: torch.device
) -> torch.Tensor | None:
    """Query j (slot start + j) sees slots <= start + j; None for one query."""
    if segment.num_tokens == 1:
        return None
    query_slots = segment.start + torch.arange(segment.num_tokens, device=device)
    key_slots = torch.arange(num_keys, device=device)
    return key_slots[None, :] <= query_slots[:, None]  # [t, S]


AttentionInterface.register(ATTENTION_NAME, sink_attention)
