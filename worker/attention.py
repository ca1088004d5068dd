"""Attention over each session's sink cache, plugged into `transformers`.

The model runs on a packed batch: the new tokens of every session in this
step, one after another in a single row. Its projections, norms and MLPs run
once over all of them; this attention function splits the row back into
sessions and attends each one against its own cache with its own in-cache
positions. The model is called with every position id set to zero, so its
own rotary embedding is the identity and the keys it hands over are
unrotated.

Decoding sessions (one new token each) are the common case and the one whose
cost is mostly per-call overhead, so they take a batched path: their queries
and keys are rotated together, each to its own position. Sessions whose
caches sit in consecutive rows of a shared pool block (see kv_pool) then
write their new keys with one indexed store per tensor and attend in one
call, keys beyond each row's own length masked off; a cache outside a pool
writes and attends on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from worker.kv_pool import KVBlock
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
class DecodeRun:
    """Decode segments in consecutive rows of one pool block.

    They are one strided slice of the block, so they attend in one call:
    each query against its own row, keys past its row's length masked off.
    """

    block: KVBlock
    rows: slice  # the block rows, in order
    members: torch.Tensor | None  # [n] their indices in the decode batch;
    # None when they are the whole batch, in order
    row_ids: torch.Tensor  # [n] block row of each
    slots: torch.Tensor  # [n] the slot each new token takes
    num_keys: int  # the longest of their caches after this token
    segments: list[Segment]
    mask: torch.Tensor | None  # [n, 1, 1, num_keys] which slots each may
    # see; None when every member sees them all

    def pick(self, x: torch.Tensor) -> torch.Tensor:
        """The members' columns of x [heads, B, D]: [heads, n, D]."""
        return x if self.members is None else x.index_select(1, self.members)


@dataclass
class DecodeBatch:
    """The one-token segments of a step, gathered for batched rotation."""

    segments: list[Segment]
    rows: torch.Tensor  # [B] their indices in the packed row
    cos: torch.Tensor  # [B, D] rotary tables at each new token's position
    sin_signed: torch.Tensor  # [B, D]
    whole_row: bool  # every token of the step is a decode token, in order
    runs: list[DecodeRun]  # the pooled segments, attended run by run
    alone: list[int]  # indices of segments attended one by one


@dataclass
class PackedStep:
    """Everything the attention function needs for one forward pass."""

    segments: list[Segment]
    rotary: RotaryTables
    decode: DecodeBatch | None = None
    prefill: list[Segment] | None = None

    def __post_init__(self) -> None:
        singles = [s for s in self.segments if s.num_tokens == 1]
        self.prefill = [s for s in self.segments if s.num_tokens > 1]
        if not singles:
            return
        device = self.rotary.cos.device
        positions = []
        for segment in singles:
            where = segment.cache.slot_positions(segment.start, segment.start + 1)
            positions.append(where.start if isinstance(where, slice) else int(where[0]))
        runs, alone = _runs(singles, device)
        cos, sin_signed = self.rotary.tables(torch.tensor(positions, device=device))
        self.decode = DecodeBatch(
            singles,
            torch.tensor([s.offset for s in singles], device=device),
            cos,
            sin_signed,
            whole_row=not self.prefill,
            runs=runs,
            alone=alone,
        )


def _runs(
    singles: list[Segment], device: torch.device
) -> tuple[list[DecodeRun], list[int]]:
    """Split decode segments into runs of consecutive pool rows."""
    pooled: dict[int, list[tuple[int, int]]] = {}  # block id -> (row, index)
    blocks: dict[int, KVBlock] = {}
    alone = []
    for index, segment in enumerate(singles):
        block = segment.cache.block
        if block is None:
            alone.append(index)
            continue
        blocks[id(block)] = block
        pooled.setdefault(id(block), []).append((segment.cache.row, index))
    runs = []
    for key, members in pooled.items():
        members.sort()
        group: list[tuple[int, int]] = []
        for row, index in members:
            if group and row != group[-1][0] + 1:
                runs.append(_run(blocks[key], group, singles, device))
                group = []
            group.append((row, index))
        runs.append(_run(blocks[key], group, singles, device))
    return runs, alone


def _run(
    block: KVBlock,
    group: list[tuple[int, int]],
    singles: list[Segment],
    device: torch.device,
) -> DecodeRun:
    slots = [singles[index].start for _, index in group]
    indices = [index for _, index in group]
    num_keys = max(slots) + 1
    slot_tensor = torch.tensor(slots, device=device)
    mask = None
    if min(slots) != max(slots):
        key_slots = torch.arange(num_keys, device=device)
        mask = (key_slots[None, :] <= slot_tensor[:, None])[:, None, None, :]
    whole = indices == list(range(len(singles)))
    return DecodeRun(
        block,
        slice(group[0][0], group[-1][0] + 1),
        None if whole else torch.tensor(indices, device=device),
        torch.tensor([row for row, _ in group], device=device),
        slot_tensor,
        num_keys,
        [singles[index] for index in indices],
        mask,
    )


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
    rotary = packed_step.rotary
    batch = packed_step.decode
    if batch is not None and batch.whole_row:
        return _decode_attention(layer, batch, rotary, query, key, value, scaling)[
            None
        ], None
    output = query.new_empty(query.shape[2], query.shape[1], query.shape[3])
    for segment in packed_step.prefill:
        rows = slice(segment.offset, segment.offset + segment.num_tokens)
        keys, values = segment.cache.write(
            layer, segment.start, key[0, :, rows], value[0, :, rows]
        )  # [KVH, S, D] each
        end = segment.start + segment.num_tokens
        positions = segment.cache.slot_positions(segment.start, end)
        q = rotary.rotate(query[0, :, rows], positions)  # [H, t, D]
        mask = _causal_mask(segment, keys.shape[1], query.device)
        output[rows] = F.scaled_dot_product_attention(
            q[None],
            keys[None],
            values[None],
            attn_mask=mask,
            scale=scaling,
            enable_gqa=True,
        )[0].transpose(0, 1)
    if batch is not None:
        attended = _decode_attention(layer, batch, rotary, query, key, value, scaling)
        output.index_copy_(0, batch.rows, attended)
    return output[None], None  # [1, T, H, D]


def _decode_attention(
    layer: int,
    batch: DecodeBatch,
    rotary: RotaryTables,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """One new token per session: rotate all at once; write and attend per
    run of pooled rows, and one by one for caches outside a pool. Returns
    [B, H, D], token-major."""
    if batch.whole_row:
        q, k, v = query[0], key[0], value[0]  # [H or KVH, B, D]
    else:
        q = query[0].index_select(1, batch.rows)
        k = key[0].index_select(1, batch.rows)
        v = value[0].index_select(1, batch.rows)
    q_rot = rotary.rotate_with(q, batch.cos, batch.sin_signed)
    k_rot = rotary.rotate_with(k, batch.cos, batch.sin_signed)
    if len(batch.runs) == 1 and batch.runs[0].members is None:
        return _attend_run(layer, batch.runs[0], q_rot, k, k_rot, v, scaling)
    attended = q.new_empty(q.shape[1], q.shape[0], q.shape[2])  # [B, H, D]
    for i in batch.alone:
        segment = batch.segments[i]
        keys, values = segment.cache.write_rotated(
            layer, segment.start, k[:, i : i + 1], k_rot[:, i : i + 1], v[:, i : i + 1]
        )
        attended[i] = _attend_one_query(
            q_rot[:, i][None], keys[None], values[None], None, scaling
        )[0]
    for run in batch.runs:
        out = _attend_run(layer, run, q_rot, k, k_rot, v, scaling)
        attended.index_copy_(0, run.members, out)
    return attended


def _attend_run(
    layer: int,
    run: DecodeRun,
    q_rot: torch.Tensor,
    k: torch.Tensor,
    k_rot: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """Write a run's new keys and values into its block rows, then attend
    them all in one call: [n, H, D]."""
    for segment in run.segments:
        segment.cache.prepare_write(layer, segment.start, 1)
    block = run.block
    # [KVH, n, D] -> [n, KVH, D] at (row, slot) of each member
    for store, new in ((block.k_raw, k), (block.k_rot, k_rot), (block.v, v)):
        store[layer][run.row_ids, :, run.slots] = run.pick(new).transpose(0, 1)
    keys = block.k_rot[layer, run.rows, :, : run.num_keys]  # [n, KVH, S, D]
    values = block.v[layer, run.rows, :, : run.num_keys]
    q = run.pick(q_rot).transpose(0, 1)  # [n, H, D]
    return _attend_one_query(q, keys, values, run.mask, scaling)


def _attend_one_query(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """One query per row: q [n, H, D] against keys and values [n, KVH, S, D]
    (mask [n, 1, 1, S] or None) -> [n, H, D].

    On the CPU in bf16 or fp16 the fused attention kernel runs a single
    query 4-9x slower than two batched matrix products do (measured at
    1-32 rows of 300-1,024 keys), so there it is two products around a
    softmax taken in fp32; elsewhere, the fused kernel.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(
            q[:, :, None], keys, values, attn_mask=mask, scale=scaling, enable_gqa=True
        )[:, :, 0]
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    scale = head_dim**-0.5 if scaling is None else scaling
    # Scaled before the product, so that fp16 scores cannot overflow.
    grouped = (q * scale).view(
        num_rows, num_kv_heads, num_heads // num_kv_heads, head_dim
    )
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float()  # [n, KVH, G, S]
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(weights, values)  # [n, KVH, G, D]
    return out.view(num_rows, num_heads, head_dim)


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
