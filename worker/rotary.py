"""Rotary position tables for re-assigning positions inside the cache.

The model's own attention applies the rotary embedding before any cache sees
the keys. sinkserve calls the model with every position set to zero, so that
rotation is the identity, and applies the rotation itself with positions that
live inside the cache. This module turns the model's rotary module into
tables of cos and sin indexed by in-cache position.
"""

from __future__ import annotations

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's attention cannot have its cache re-positioned."""


class RotaryTables:
    """cos/sin of every in-cache position, kept in fp32.

    Rotating in fp32 from the unrotated key and rounding once to the cache
    dtype gives the correctly rounded key at any position, however many
    evictions came before: nothing accumulates.
    """

    def __init__(self, rotary_emb: nn.Module, head_dim: int, max_positions: int):
        device = _module_device(rotary_emb)
        position_ids = torch.arange(max_positions, device=device)[None]
        probe = torch.zeros(1, max_positions, head_dim, device=device)
        cos, sin = rotary_emb(probe, position_ids)  # [1, P, D] each
        if cos.shape[-1] != head_dim:
            raise UnsupportedModelError(
                f"partial rotary embeddings ({cos.shape[-1]} of {head_dim} dims) "
                "are not supported"
            )
        # With position zero the model already scaled q and k by its
        # attention factor (cos(0) * factor), so the tables leave it out.
        scaling = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
        self.attention_scaling = scaling
        self.cos = cos[0].float() / scaling  # [P, D]
        sin = sin[0].float() / scaling
        half = head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * (sin with its first half
        # negated): one roll instead of two slices, a negation and a cat.
        self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.half = half
        self.max_positions = max_positions

    def tables(
        self, positions: torch.Tensor | slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of the positions given: [S, D] each."""
        return self.cos[positions], self.sin_signed[positions]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | slice) -> torch.Tensor:
        """Rotate x [..., S, D] to the positions given (S of them)."""
        return self.rotate_with(x, *self.tables(positions))

    def rotate_with(
        self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
    ) -> torch.Tensor:
        """Rotate x [..., S, D] with tables [S, D] from `tables`; in fp32,
        rounded once to x's dtype."""
        x32 = x.float()
        rotated = x32 * cos + x32.roll(self.half, -1) * sin_signed
        return rotated.to(x.dtype)


def _module_device(module: nn.Module) -> torch.device:
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")
