"""The worker's own forward pass against the library's, on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import build_tiny
from tests.worker.test_model_families import CASES
from worker.engine import Engine
from worker.kv_pool import KVPool
from worker.model import weight_bytes
from worker.runner import ModelRunner
from worker.sink_cache import SinkCache


def step_both(
    ours: ModelRunner,
    library: ModelRunner,
    caches: list[SinkCache],
    twins: list[SinkCache],
    steps: list[list[list[int]]],
    tolerance: float,
) -> None:
    """Run each step's tokens through both runners on their own caches; the
    logits must agree."""
    for tokens in steps:
        mine, _ = ours.forward(
            [(c, t, [1] * len(t)) for c, t in zip(caches, tokens, strict=True)]
        )
        theirs, _ = library.forward(
            [(c, t, [1] * len(t)) for c, t in zip(twins, tokens, strict=True)]
        )
        torch.testing.assert_close(mine, theirs, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    CASES,
    ids=[f"{t}-{o['rope_parameters']['rope_type']}" if o else t for t, o in CASES],
)
def test_decoder_matches_the_library_forward(tokenizer, model_type, overrides):
    """Prefill chunks, mixed steps and pooled decode steps through evictions:
    every logit and every cached key agrees with the library's forward run
    on twin caches (the library's forward reaches the fused weights through
    its own modules)."""
    loaded, _ = build_tiny(tokenizer, model_type, **overrides)
    assert loaded.decoder is not None
    ours, library = ModelRunner(loaded), ModelRunner(loaded, library_forward=True)
    pool = KVPool(Engine(loaded).cache_shape, rows_per_block=4)

    def cache() -> SinkCache:
        return SinkCache(Engine(loaded).cache_shape, loaded.rotary, 2, 12, 3, pool=pool)

    caches = [cache() for _ in range(3)]
    twins = [cache() for _ in range(3)]
    steps = [
        [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]],
        *[[[20 + i], [40 + i], [60 + i]] for i in range(6)],
        [[80], [81, 82, 83], [84]],
        *[[[90 + i], [100 + i], [110 + i]] for i in range(8)],
    ]
    step_both(ours, library, caches, twins, steps, tolerance=1e-4)
    for a, b in zip(caches, twins, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.rotated_keys(), b.rotated_keys())
        torch.testing.assert_close(a.v[:, :, : a.length], b.v[:, :, : b.length])


def test_all_logits_match_the_library_forward(tiny):
    loaded, _ = tiny
    cache = SinkCache(Engine(loaded).cache_shape, loaded.rotary, 2, 30)
    twin = copy.deepcopy(cache, {id(cache.rotary): cache.rotary})
    ids = list(range(5, 25))
    mine, _ = ModelRunner(loaded).forward([(cache, ids, [1] * 20)], all_logits=True)
    theirs, _ = ModelRunner(loaded, library_forward=True).forward(
        [(twin, ids, [1] * 20)], all_logits=True
    )
    assert mine.shape == (20, loaded.config.vocab_size)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_weights_are_stored_once_and_counted_once(tiny):
    """Every projection's weight lives in one fused matrix; the library's
    modules hold none of their own, and the bytes a step reads count each
    matrix once."""
    loaded, reference = tiny
    model = loaded.model
    names = {name for name, _ in model.named_parameters()}
    assert not any(name.endswith("proj.weight") for name in names)
    matrices = sum(
        p.numel()
        for name, p in reference.named_parameters()
        if name.endswith("proj.weight")
    )
    head = reference.lm_head.weight.numel()
    norms = sum(p.numel() for name, p in reference.named_parameters() if "norm" in name)
    assert weight_bytes(loaded) == 4 * (matrices + head + norms)
