"""Shared KV storage for the sessions of one worker.

Each session's cache is one row of a block: a block holds the raw keys,
rotated keys and values of `rows` sessions of the same capacity, laid out
[layer, row, kv_head, slot, head_dim]. A row seen from its session is an
ordinary [layer, kv_head, slot, head_dim] view, so the sink cache's own code
(writes, evictions, snapshots) does not know it is pooled. What pooling buys
is in the decode step: sessions in neighbouring rows of a block are one
strided tensor, so their new keys go in with one indexed write per layer and
they attend with one batched call, instead of one call per session.

A row is handed back when its cache is garbage collected, so a row can
never be reused while anything still holds the cache that wrote it. A
block whose rows are all free is dropped.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from worker.sink_cache import CacheShape


class KVBlock:
    """`rows` caches of one capacity, stored side by side."""

    def __init__(self, pool: KVPool, capacity: int, rows: int):
        shape = pool.shape
        size = (shape.num_layers, rows, shape.num_kv_heads, capacity, shape.head_dim)
        options = {"dtype": shape.dtype, "device": shape.device}
        # Left uninitialised: a row is zeroed when it is handed out, so the
        # memory of rows never used is never touched.
        self.k_raw = torch.empty(size, **options)
        self.k_rot = torch.empty(size, **options)
        self.v = torch.empty(size, **options)
        self.pool = pool
        self.capacity = capacity
        self.rows = rows
        self._free = list(range(rows))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take_row(self) -> int:
        """The lowest free row, zeroed: busy rows stay close together."""
        row = min(self._free)
        self._free.remove(row)
        for tensor in (self.k_raw, self.k_rot, self.v):
            tensor[:, row].zero_()
        return row

    def give_back(self, row: int) -> None:
        self._free.append(row)

    def views(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row `row` as [layer, kv_head, slot, head_dim] views."""
        return self.k_raw[:, row], self.k_rot[:, row], self.v[:, row]


class KVPool:
    """Blocks of rows, by capacity; thread-safe."""

    def __init__(self, shape: CacheShape, rows_per_block: int = 16):
        if rows_per_block < 1:
            raise ValueError("rows_per_block must be >= 1")
        self.shape = shape
        self.rows_per_block = rows_per_block
        self._blocks: dict[int, list[KVBlock]] = {}
        self._lock = threading.Lock()

    def attach(self, owner: object, capacity: int) -> tuple[KVBlock, int]:
        """A row for `owner`, given back when `owner` is garbage collected."""
        with self._lock:
            blocks = self._blocks.setdefault(capacity, [])
            block = next((b for b in blocks if b.num_free), None)
            if block is None:
                block = KVBlock(self, capacity, self.rows_per_block)
                blocks.append(block)
            row = block.take_row()
        weakref.finalize(owner, self._release, block, row)
        return block, row

    def _release(self, block: KVBlock, row: int) -> None:
        with self._lock:
            block.give_back(row)
            if block.num_free == block.rows:
                self._blocks[block.capacity].remove(block)

    def num_blocks(self) -> int:
        with self._lock:
            return sum(len(blocks) for blocks in self._blocks.values())
