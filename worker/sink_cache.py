"""The sink + window KV cache of one session.

Slots [0, length) hold the cached tokens, and the token in slot i has position
i: positions live inside the cache, not in the original text. The first
`num_pinned` slots (the attention sinks and the system prompt) never move.
Eviction removes the oldest unpinned slots and shifts the rest down, so the
survivors take new, contiguous positions.

Keys are kept twice: before rotation (`k_raw`, the exact source of truth) and
rotated at their current slot (`k_rot`, what attention reads). After an
eviction the moved keys are re-rotated from `k_raw` lazily, once, before the
next read: several evictions queued before one forward pass cost one
rotation, and no rotation is ever applied to an already rotated key, so the
positions cannot drift however long the session runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from worker.kv_pool import KVBlock, KVPool
from worker.rotary import RotaryTables


@dataclass(frozen=True)
class CacheShape:
    """Per-token geometry of a model's KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def bytes_per_token(self) -> int:
        """Theoretical K+V bytes for one cached token."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * element_size


@dataclass(frozen=True)
class Eviction:
    """What one eviction removed, for the client and the metrics."""

    num_evicted: int
    turns_gone: tuple[int, ...]  # turns with no token left in the cache
    turn_partial: int | None  # the oldest turn that lost some tokens, if any
    length_after: int


class SinkCache:
    """Preallocated, bounded KV storage with positions assigned inside it.

    Invariant between forward passes: `length == len(token_ids) ==
    len(turn_ids)` and the next token takes position `length`; `length <=
    cache_size` except right after a chunk larger than the window, until
    `trim()` runs.
    """

    def __init__(
        self,
        shape: CacheShape,
        rotary: RotaryTables,
        sink_size: int,
        window_size: int,
        evict_size: int = 1,
        headroom: int = 0,
        whole_turns: bool = False,
        pool: KVPool | None = None,
    ):
        if sink_size < 0 or window_size < 1 or evict_size < 1 or headroom < 0:
            raise ValueError("sink_size >= 0, window_size >= 1, evict_size >= 1")
        capacity = sink_size + window_size + headroom
        if capacity > rotary.max_positions:
            raise ValueError(
                f"capacity {capacity} exceeds the rotary table ({rotary.max_positions})"
            )
        # The storage: a row of a shared pool, or tensors of its own.
        self.block: KVBlock | None = None
        self.row: int | None = None
        if pool is not None:
            self.block, self.row = pool.attach(self, capacity)
            self.k_raw, self.k_rot, self.v = self.block.views(self.row)
        else:
            size = (shape.num_layers, shape.num_kv_heads, capacity, shape.head_dim)
            options = {"dtype": shape.dtype, "device": shape.device}
            self.k_raw = torch.zeros(size, **options)  # [L, KVH, C, D]
            self.k_rot = torch.zeros(size, **options)  # [L, KVH, C, D]
            self.v = torch.zeros(size, **options)  # [L, KVH, C, D]
        self.shape = shape
        self.rotary = rotary
        self.sink_size = sink_size
        self.window_size = window_size
        self.cache_size = sink_size + window_size
        self.evict_size = evict_size
        # Evict whole oldest turns: a turn that no longer fits leaves entirely.
        self.whole_turns = whole_turns
        self.capacity = capacity
        self.length = 0
        self.token_ids: list[int] = []
        self.turn_ids: list[int] = []
        self._pin_target = sink_size
        # Per layer, the first slot whose rotated key is out of date.
        self._stale_from = [capacity] * shape.num_layers

    @property
    def pin_target(self) -> int:
        """How many leading slots are pinned once the cache holds them."""
        return self._pin_target

    @property
    def num_pinned(self) -> int:
        return min(self._pin_target, self.length)

    def pin_through(self, length: int) -> None:
        """Pin slots [0, length) (the system prompt) besides the sinks."""
        self._pin_target = max(self.sink_size, length)

    def move_into(self, pool: KVPool) -> None:
        """Move this cache's storage into a row of `pool` (it must fit)."""
        if self.block is not None:
            raise ValueError("the cache is already pooled")
        if pool.shape != self.shape:
            raise ValueError("the pool holds caches of another model")
        block, row = pool.attach(self, self.capacity)
        for mine, theirs in zip(
            (self.k_raw, self.k_rot, self.v), block.views(row), strict=True
        ):
            theirs.copy_(mine)
        self.block, self.row = block, row
        self.k_raw, self.k_rot, self.v = block.views(row)

    def __deepcopy__(self, memo: dict) -> SinkCache:
        """An independent copy with storage of its own, never pooled; the
        rotary tables and the geometry are shared, being read-only."""
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            if name == "block":
                copied = None
            elif name in ("rotary", "shape"):
                copied = value
            elif isinstance(value, torch.Tensor):
                copied = value.clone()  # a pooled view becomes its own tensor
            else:
                copied = copy.deepcopy(value, memo)
            setattr(clone, name, copied)
        clone.row = None
        return clone

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.k_raw, self.k_rot, self.v)
        )

    def make_room(self, incoming: int) -> Eviction | None:
        """Evict before a forward pass so `incoming` tokens fit, if they can."""
        overflow = self.length + incoming - self.cache_size
        if overflow <= 0:
            return None
        return self._evict(max(overflow, self.evict_size))

    def trim(self) -> Eviction | None:
        """Evict after a chunk that did not fit, back to `cache_size`."""
        overflow = self.length - self.cache_size
        return self._evict(overflow) if overflow > 0 else None

    def write(
        self, layer: int, start: int, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store unrotated keys and values at slots [start, start + T) of a layer.

        k_new, v_new: [KVH, T, D]. Returns the layer's rotated keys and values
        for slots [0, start + T), ready for attention ([KVH, S, D] views).
        The tokens count as cached once `append` records them.
        """
        end = start + k_new.shape[1]
        k_rot = self.rotary.rotate(k_new, self.slot_positions(start, end))
        return self.write_rotated(layer, start, k_new, k_rot, v_new)

    def write_rotated(
        self,
        layer: int,
        start: int,
        k_new: torch.Tensor,
        k_rot: torch.Tensor,
        v_new: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`write`, with the new keys already rotated to their slots' positions."""
        end = start + k_new.shape[1]
        self.prepare_write(layer, start, k_new.shape[1])
        self.k_raw[layer, :, start:end] = k_new
        self.v[layer, :, start:end] = v_new
        self.k_rot[layer, :, start:end] = k_rot
        return self.k_rot[layer, :, :end], self.v[layer, :, :end]

    def prepare_write(self, layer: int, start: int, count: int) -> None:
        """Check a write of `count` tokens at `start`; bring the layer's rotated
        keys up to date first. Whoever writes the storage directly calls this."""
        if start != self.length:
            raise ValueError(f"write at slot {start}, cache length is {self.length}")
        if start + count > self.capacity:
            raise ValueError(
                f"write to slot {start + count} beyond capacity {self.capacity}"
            )
        self._refresh(layer, start)

    def slot_positions(self, start: int, end: int) -> slice | torch.Tensor:
        """Rotary positions of slots [start, end): the slots themselves.

        The one place positions are decided; a subclass may assign others
        (the perplexity benchmark's no-re-positioning baseline does).
        """
        return slice(start, end)

    def append(self, token_ids: list[int], turn_ids: list[int]) -> None:
        """Record tokens whose keys and values every layer has written."""
        if len(token_ids) != len(turn_ids):
            raise ValueError("one turn id per token")
        self.token_ids.extend(token_ids)
        self.turn_ids.extend(turn_ids)
        self.length += len(token_ids)

    def truncate(self, length: int) -> None:
        """Drop the newest tokens so that `length` remain."""
        if not self.num_pinned <= length <= self.length:
            raise ValueError(
                f"truncate to {length} outside [{self.num_pinned}, {self.length}]"
            )
        del self.token_ids[length:]
        del self.turn_ids[length:]
        self.length = length

    def positions(self) -> list[int]:
        """The position of each cached token: its slot."""
        return list(range(self.length))

    def rotated_keys(self) -> torch.Tensor:
        """Every layer's rotated keys for the cached slots: [L, KVH, length, D]."""
        for layer in range(self.shape.num_layers):
            self._refresh(layer, self.length)
        return self.k_rot[:, :, : self.length]

    def raw_keys(self) -> torch.Tensor:
        return self.k_raw[:, :, : self.length]  # [L, KVH, length, D]

    def _evict(self, count: int) -> Eviction | None:
        """Drop the `count` oldest unpinned tokens; later slots shift down."""
        first = self.num_pinned
        count = min(count, self.length - first)
        if count <= 0:
            return None
        if self.whole_turns:
            count = self._to_turn_boundary(first, count)
        kept = self.length - first - count
        src = slice(first + count, self.length)
        dst = slice(first, first + kept)
        # clone: the source and destination ranges overlap.
        self.k_raw[:, :, dst] = self.k_raw[:, :, src].clone()
        self.v[:, :, dst] = self.v[:, :, src].clone()
        self._stale_from = [min(s, first) for s in self._stale_from]

        evicted_turns = set(self.turn_ids[first : first + count])
        del self.token_ids[first : first + count]
        del self.turn_ids[first : first + count]
        self.length = first + kept
        remaining = set(self.turn_ids)
        partial = sorted(evicted_turns & remaining)
        return Eviction(
            num_evicted=count,
            turns_gone=tuple(sorted(evicted_turns - remaining)),
            turn_partial=partial[0] if partial else None,
            length_after=self.length,
        )

    def _to_turn_boundary(self, first: int, count: int) -> int:
        """Round an eviction up to the end of the turn it cuts into, unless
        that turn is the newest: its tokens are still arriving, and a turn
        longer than the window can only be evicted token by token."""
        end = first + count
        newest = self.turn_ids[self.length - 1]
        cut_turn = self.turn_ids[end - 1]
        if cut_turn == newest:
            return count
        while end < self.length and self.turn_ids[end] == cut_turn:
            end += 1
        return end - first

    def _refresh(self, layer: int, end: int) -> None:
        """Re-rotate a layer's moved keys; `end` is the cache length."""
        stale = self._stale_from[layer]
        if stale < end:
            raw = self.k_raw[layer, :, stale:end]
            positions = self.slot_positions(stale, end)
            self.k_rot[layer, :, stale:end] = self.rotary.rotate(raw, positions)
        self._stale_from[layer] = self.capacity
