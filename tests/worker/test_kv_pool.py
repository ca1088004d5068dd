"""The shared KV pool: rows handed out, zeroed, and back when a cache goes."""

from __future__ import annotations

import gc

import torch

from tests.worker.test_engine import run_turn
from worker.engine import Engine, EngineConfig
from worker.kv_pool import KVPool
from worker.session import SamplingParams
from worker.sink_cache import SinkCache
from worker.snapshot import decode_snapshot, encode_snapshot


def _cache(loaded, pool: KVPool, window: int = 12) -> SinkCache:
    return SinkCache(
        Engine(loaded).cache_shape, loaded.rotary, 2, window, evict_size=4, pool=pool
    )


def test_rows_are_views_of_one_block_and_come_back_zeroed(tiny):
    loaded, _ = tiny
    pool = KVPool(Engine(loaded).cache_shape, rows_per_block=3)
    a, b = _cache(loaded, pool), _cache(loaded, pool)
    assert (a.block, a.row, b.row) == (b.block, 0, 1)
    a.k_raw.fill_(1.0)  # writes through the view into the block
    assert a.block.k_raw[:, 0].eq(1.0).all() and a.block.k_raw[:, 1].eq(0).all()
    assert a.nbytes() == 3 * a.k_raw.numel() * a.k_raw.element_size()

    del a
    gc.collect()
    c = _cache(loaded, pool)
    assert c.row == 0  # the lowest free row, handed out again
    assert c.k_raw.eq(0).all() and c.k_rot.eq(0).all() and c.v.eq(0).all()


def test_blocks_grow_by_capacity_and_go_when_empty(tiny):
    loaded, _ = tiny
    pool = KVPool(Engine(loaded).cache_shape, rows_per_block=2)
    small = [_cache(loaded, pool) for _ in range(3)]
    large = _cache(loaded, pool, window=30)
    assert pool.num_blocks() == 3  # two of the small capacity, one large
    assert large.block is not small[0].block
    del small
    gc.collect()
    assert pool.num_blocks() == 1


def test_an_engine_pools_opened_and_restored_sessions(tiny):
    loaded, _ = tiny
    engine = Engine(loaded, EngineConfig(sink_size=4, window_size=60, evict_size=4))
    session = engine.open_session(None, SamplingParams(max_new_tokens=4))
    run_turn(engine, session, "Hello there, how are you?")
    assert session.cache.block is not None

    blob = encode_snapshot(session, loaded.fingerprint)
    other = Engine(loaded, EngineConfig(sink_size=4, window_size=60, evict_size=4))
    restored = decode_snapshot(
        blob, loaded.fingerprint, other.cache_shape, loaded.rotary
    )
    assert restored.cache.block is None  # outside any engine, it owns its storage
    other.adopt_session(restored)
    assert restored.cache.block is not None
    assert restored.cache.block.pool is other.kv_pool
    length = session.cache.length
    torch.testing.assert_close(
        restored.cache.raw_keys(), session.cache.raw_keys()[:, :, :length]
    )
    torch.testing.assert_close(
        restored.cache.rotated_keys(), session.cache.rotated_keys()
    )
