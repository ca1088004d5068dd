"""The sink + window cache: positions, pinning and eviction, checked exactly."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from worker.model import LoadedModel
from worker.runner import ModelRunner
from worker.sink_cache import CacheShape, SinkCache


def make_cache(
    loaded: LoadedModel, sink: int, window: int, evict: int = 1, headroom: int = 0
):
    config = loaded.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    shape = CacheShape(
        config.num_hidden_layers,
        config.num_key_value_heads,
        head_dim,
        torch.float32,
        torch.device("cpu"),
    )
    return SinkCache(shape, loaded.rotary, sink, window, evict, headroom)


def reference_rotation(loaded: LoadedModel, raw: torch.Tensor) -> torch.Tensor:
    """The library's own rotary embedding of raw keys [L, KVH, S, D] at 0..S-1."""
    positions = torch.arange(raw.shape[2])[None]
    cos, sin = loaded.model.model.rotary_emb(raw, positions)  # [1, S, D]
    rotated, _ = apply_rotary_pos_emb(raw, raw, cos, sin)
    return rotated


def assert_consistent(loaded: LoadedModel, cache: SinkCache) -> None:
    assert cache.length == len(cache.token_ids) == len(cache.turn_ids)
    assert cache.positions() == list(range(cache.length))
    expected = reference_rotation(loaded, cache.raw_keys())
    torch.testing.assert_close(cache.rotated_keys(), expected, rtol=1e-5, atol=1e-5)


def test_tiny_case_one_sink_window_three(tiny):
    loaded, _ = tiny
    cache = make_cache(loaded, sink=1, window=3, headroom=10)
    token_ids = list(range(100, 110))
    ModelRunner(loaded).forward([(cache, token_ids, [1] * 10)])

    assert cache.token_ids == [100, 107, 108, 109]
    assert cache.positions() == [0, 1, 2, 3]
    assert_consistent(loaded, cache)
    # Layer 0 keys depend only on the token, so the survivors' raw keys must
    # be those of tokens 0, 7, 8 and 9 exactly.
    layer = loaded.model.model.layers[0]
    with torch.no_grad():
        hidden = layer.input_layernorm(
            loaded.model.model.embed_tokens(torch.tensor(token_ids))
        )
        keys = layer.self_attn.k_proj(hidden).view(10, -1, cache.shape.head_dim)
    expected = keys[[0, 7, 8, 9]].transpose(0, 1)  # [KVH, 4, D]
    torch.testing.assert_close(cache.raw_keys()[0], expected)


@settings(max_examples=12, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 9), min_size=3, max_size=14),
    sink=st.integers(0, 4),
    window=st.integers(4, 16),
    evict=st.integers(1, 5),
)
def test_positions_stay_exact_through_evictions(tokenizer, chunks, sink, window, evict):
    from tests.conftest import build_tiny

    loaded, _ = build_tiny(tokenizer)
    cache = make_cache(loaded, sink, window, min(evict, window), headroom=16)
    runner = ModelRunner(loaded)
    fed = 0
    pinned_ids = None
    pinned_keys = None
    for turn, size in enumerate(chunks, start=1):
        token_ids = [(fed + i) % 500 + 1000 for i in range(size)]
        fed += size
        runner.forward([(cache, token_ids, [turn] * size)])
        assert cache.length <= cache.cache_size
        assert_consistent(loaded, cache)
        if pinned_ids is None and cache.length >= sink:
            pinned_ids = cache.token_ids[:sink]
            pinned_keys = cache.raw_keys()[:, :, :sink].clone()
        if pinned_ids is not None:
            assert cache.token_ids[:sink] == pinned_ids
            torch.testing.assert_close(cache.raw_keys()[:, :, :sink], pinned_keys)


def test_several_evictions_queued_before_one_forward(tiny):
    loaded, _ = tiny
    cache = make_cache(loaded, sink=2, window=30, evict=1)
    runner = ModelRunner(loaded)
    runner.forward([(cache, list(range(200, 232)), [1] * 32)])
    stale = cache.k_rot.clone()
    for _ in range(3):  # three evictions, no forward pass between them
        cache._evict(5)
    assert cache.length == 32 - 15
    # Nothing is rotated until the next read, and then from the raw keys once.
    torch.testing.assert_close(cache.k_rot, stale)
    runner.forward([(cache, [300], [2])])
    assert_consistent(loaded, cache)
    assert cache.token_ids[:2] == [200, 201]
    assert cache.token_ids[2:] == list(range(217, 232)) + [300]


def test_eviction_events_come_in_blocks(tiny):
    loaded, _ = tiny
    sink, window, evict = 4, 40, 8
    cache = make_cache(loaded, sink, window, evict)
    runner = ModelRunner(loaded)
    events = []
    num_tokens = 200
    for i in range(num_tokens):
        _, evictions = runner.forward([(cache, [1000 + i], [1])])
        events.extend(evictions[0])
    beyond = num_tokens - (sink + window)
    assert all(e.num_evicted == evict for e in events)
    assert len(events) == -(-beyond // evict)
    assert sum(e.num_evicted for e in events) >= beyond
    assert_consistent(loaded, cache)


def test_eviction_reports_turns_gone_and_partial(tiny):
    loaded, _ = tiny
    cache = make_cache(loaded, sink=2, window=10, evict=4)
    runner = ModelRunner(loaded)
    runner.forward([(cache, [1, 2], [0, 0])])  # the "system prompt": pinned sinks
    runner.forward([(cache, [10, 11, 12], [1, 1, 1])])
    runner.forward([(cache, [20, 21, 22, 23], [2] * 4)])
    _, evictions = runner.forward([(cache, [30, 31, 32, 33], [3] * 4)])
    (eviction,) = evictions[0]
    assert eviction.num_evicted == 4
    assert eviction.turns_gone == (1,)
    assert eviction.turn_partial == 2
    assert cache.token_ids == [1, 2, 21, 22, 23, 30, 31, 32, 33]


def test_truncate_drops_the_newest_tokens(tiny):
    loaded, _ = tiny
    cache = make_cache(loaded, sink=2, window=20)
    runner = ModelRunner(loaded)
    runner.forward([(cache, list(range(500, 510)), [1] * 10)])
    cache.truncate(6)
    assert cache.token_ids == list(range(500, 506))
    runner.forward([(cache, [600], [2])])
    assert cache.token_ids[-1] == 600
    assert_consistent(loaded, cache)


def test_whole_turn_eviction_never_leaves_half_a_turn(tiny):
    loaded, _ = tiny
    config = loaded.model.config
    shape = CacheShape(
        config.num_hidden_layers,
        config.num_key_value_heads,
        16,
        torch.float32,
        torch.device("cpu"),
    )
    cache = SinkCache(shape, loaded.rotary, 2, 20, evict_size=1, whole_turns=True)
    runner = ModelRunner(loaded)
    runner.forward([(cache, [1, 2], [0, 0])])
    for turn in range(1, 12):
        _, evictions = runner.forward([(cache, [100 + turn] * 5, [turn] * 5)])
        for eviction in evictions[0]:
            assert eviction.turn_partial is None
            assert eviction.num_evicted % 5 == 0
        unpinned = cache.turn_ids[2:]
        assert all(unpinned.count(t) == 5 for t in set(unpinned))
        assert_consistent(loaded, cache)


def test_whole_turn_eviction_splits_a_turn_longer_than_the_window(tiny):
    loaded, _ = tiny
    cache = make_cache(loaded, sink=2, window=10)
    cache.whole_turns = True
    runner = ModelRunner(loaded)
    runner.forward([(cache, [1, 2], [0, 0])])
    for i in range(30):  # one long turn, token by token
        runner.forward([(cache, [200 + i], [1])])
    assert cache.length == 12 and cache.token_ids[2:] == list(range(220, 230))
