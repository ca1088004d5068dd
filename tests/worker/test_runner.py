"""Packed steps: each session's logits do not depend on who shares its step."""

from __future__ import annotations

import copy

import pytest
import torch

from worker.engine import Engine
from worker.kv_pool import KVPool
from worker.runner import ModelRunner
from worker.sink_cache import SinkCache


def _caches(
    loaded, count: int, history: list[list[int]], pool: KVPool | None = None
) -> list[SinkCache]:
    runner = ModelRunner(loaded)
    shape = Engine(loaded).cache_shape
    caches = []
    for ids in history[:count]:
        cache = SinkCache(shape, loaded.rotary, 2, 14, evict_size=4, pool=pool)
        for start in range(0, len(ids), 7):
            piece = ids[start : start + 7]
            runner.forward([(cache, piece, [1] * len(piece))])
        caches.append(cache)
    return caches


def test_mixed_packed_step_matches_each_session_alone(tiny):
    loaded, _ = tiny
    runner = ModelRunner(loaded)
    # Histories long enough that some caches have evicted (and so hold keys
    # that must be re-rotated), with different lengths and positions.
    history = [list(range(5, 5 + n)) for n in (3, 15, 16, 29, 40)]
    caches = _caches(loaded, 5, history)
    new = [[7], [9, 11, 13], [17], [19], [23, 29]]  # decode and prefill mixed
    alone = []
    for cache, ids in zip(caches, new, strict=True):
        twin = copy.deepcopy(cache, {id(cache.rotary): cache.rotary})
        logits, _ = runner.forward([(twin, ids, [1] * len(ids))])
        alone.append(logits[0])
    logits, _ = runner.forward(
        [(c, ids, [1] * len(ids)) for c, ids in zip(caches, new, strict=True)]
    )
    for row, expected in enumerate(alone):
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "block_rows", [None, 2, 8], ids=["own storage", "two blocks", "one block"]
)
def test_decode_only_steps_match_one_at_a_time_through_evictions(tiny, block_rows):
    """Pooled caches in neighbouring rows attend as one masked batch, each
    with its own length; outside a pool each attends on its own."""
    loaded, _ = tiny
    runner = ModelRunner(loaded)
    history = [list(range(3, 3 + n)) for n in (6, 13, 20)]
    pool = KVPool(Engine(loaded).cache_shape, block_rows) if block_rows else None
    packed = _caches(loaded, 3, history, pool)
    if pool is not None:
        assert pool.num_blocks() == (2 if block_rows == 2 else 1)
    single = [copy.deepcopy(c, {id(c.rotary): c.rotary}) for c in packed]
    for step in range(12):  # every cache evicts at least once on the way
        tokens = [[30 + step + i] for i in range(3)]
        together, _ = runner.forward(
            [(c, t, [1]) for c, t in zip(packed, tokens, strict=True)]
        )
        for row, (cache, t) in enumerate(zip(single, tokens, strict=True)):
            one, _ = runner.forward([(cache, t, [1])])
            torch.testing.assert_close(together[row], one[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(packed, single, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.rotated_keys(), b.rotated_keys())


def test_a_cache_twice_in_one_step_is_refused_before_anything_changes(tiny):
    loaded, _ = tiny
    runner = ModelRunner(loaded)
    (cache,) = _caches(loaded, 1, [list(range(3, 20))])
    before = (list(cache.token_ids), cache.k_raw.clone())
    with pytest.raises(ValueError, match="only once"):
        runner.forward([(cache, [5], [1]), (cache, [6], [1])])
    assert cache.token_ids == before[0]
    torch.testing.assert_close(cache.k_raw, before[1])
