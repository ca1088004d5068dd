"""The perplexity benchmark's chunked scorer against token-at-a-time streaming.

The benchmark feeds the text in chunks aligned to the eviction schedule and
claims that this scores every token exactly as streaming it alone would. These
tests check that claim on a tiny random Llama, with a small cache so that
~100 tokens go through many evictions.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from benchmarks.perplexity import (
    CacheSpec,
    NoRepositionCache,
    _Stream,
    chunk_bounds,
    make_cache,
    score_streams,
    stream_nll,
)
from worker.model import LoadedModel, prepare_model
from worker.runner import ModelRunner

SINK, WINDOW, EVICT = 2, 14, 4
NUM_TOKENS = 101  # ends with a chunk shorter than EVICT
SPECS = [
    CacheSpec.parse(f"{SINK}+{WINDOW}"),
    CacheSpec.parse(f"{SINK}+{WINDOW}-norepos"),
    CacheSpec.parse(f"0+{SINK + WINDOW}"),
]
TOLERANCE = 1e-4


VOCAB = 512


@pytest.fixture(scope="module")
def tiny() -> tuple[LoadedModel, PreTrainedModel]:
    """A random tiny Llama ready for the cache, and an untouched twin."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Large weights make attention sharp, so that a token dropped from the
        # cache or a changed position shows in the log-probabilities.
        initializer_range=0.25,
    )
    reference = LlamaForCausalLM(config).eval()
    served = copy.deepcopy(reference)
    # The tokenizer is only carried along; the tests feed token ids.
    loaded = prepare_model(served, tokenizer=None, max_positions=1024, name="tiny")
    return loaded, reference


@pytest.fixture(scope="module")
def token_ids() -> list[int]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (NUM_TOKENS,), generator=generator).tolist()


@pytest.fixture(scope="module")
def streamed(
    tiny: tuple[LoadedModel, PreTrainedModel], token_ids: list[int]
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Token-at-a-time NLL and final cache positions of every spec."""
    return {spec.name: one_at_a_time(tiny[0], spec, token_ids) for spec in SPECS}


def one_at_a_time(
    loaded: LoadedModel, spec: CacheSpec, token_ids: list[int]
) -> tuple[np.ndarray, list[int]]:
    """NLL of each token when the text is streamed one token per forward pass."""
    cache = make_cache(spec, loaded, EVICT, len(token_ids))
    runner = ModelRunner(loaded)
    nll = np.full(len(token_ids), np.nan)
    for i, token in enumerate(token_ids[:-1]):
        logits, _ = runner.forward([(cache, [token], [0])])  # [1, V]
        nll[i + 1] = -torch.log_softmax(logits[0], -1)[token_ids[i + 1]].item()
    return nll, cache.positions()


def test_chunks_fill_the_cache_then_follow_the_eviction_blocks() -> None:
    bounds = chunk_bounds(NUM_TOKENS, SINK + WINDOW, EVICT, fill_chunk=5)
    assert bounds[:4] == [(0, 5), (5, 10), (10, 15), (15, 16)]
    assert all(end - start == EVICT for start, end in bounds[4:-1])
    assert bounds[-1] == (100, 101)


@pytest.mark.parametrize("max_batch_tokens", [2048, 6])
def test_chunked_scores_equal_token_at_a_time(
    tiny: tuple[LoadedModel, PreTrainedModel],
    token_ids: list[int],
    streamed: dict[str, tuple[np.ndarray, list[int]]],
    max_batch_tokens: int,
) -> None:
    loaded, _ = tiny
    # Every spec shares the same passes, as in the benchmark; a small token
    # budget splits them across passes instead.
    chunked, _ = stream_nll(
        loaded,
        token_ids,
        SPECS,
        evict_size=EVICT,
        fill_chunk=5,
        max_batch_tokens=max_batch_tokens,
        progress=False,
    )
    for spec in SPECS:
        expected, _ = streamed[spec.name]
        assert np.isnan(chunked[spec.name][0])
        np.testing.assert_allclose(
            chunked[spec.name][1:],
            expected[1:],
            rtol=0,
            atol=TOLERANCE,
            err_msg=spec.name,
        )


def test_misaligned_chunks_are_not_exact(
    tiny: tuple[LoadedModel, PreTrainedModel],
    token_ids: list[int],
    streamed: dict[str, tuple[np.ndarray, list[int]]],
) -> None:
    """The equality above is not a tolerance too loose to see anything."""
    loaded, _ = tiny
    spec = SPECS[0]
    expected, _ = streamed[spec.name]
    cache = make_cache(spec, loaded, EVICT, NUM_TOKENS)
    bounds = [(s, min(s + 5, NUM_TOKENS)) for s in range(0, NUM_TOKENS, 5)]
    stream = _Stream(spec, cache, bounds, np.full(NUM_TOKENS, np.nan))
    score_streams(ModelRunner(loaded), token_ids, [stream], max_batch_tokens=2048)
    assert np.nanmax(np.abs(stream.nll - expected)) > 100 * TOLERANCE


def test_no_repositioning_keeps_text_positions(
    streamed: dict[str, tuple[np.ndarray, list[int]]],
) -> None:
    normal, _ = streamed[SPECS[0].name]
    fixed, positions = streamed[SPECS[1].name]
    # The survivors of block evictions: the sinks, then the newest tokens (the
    # text's last token is never fed: it has nothing to predict).
    fed = NUM_TOKENS - 1
    kept = len(positions) - SINK
    assert positions == list(range(SINK)) + list(range(fed - kept, fed))
    # Until the first eviction, slots and text positions coincide.
    cache_size = SINK + WINDOW
    np.testing.assert_allclose(
        fixed[1 : cache_size + 1], normal[1 : cache_size + 1], atol=TOLERANCE
    )
    assert np.abs(fixed[cache_size + 1 :] - normal[cache_size + 1 :]).max() > 1e-3


def test_no_repositioning_positions_follow_evictions_and_truncation(
    tiny: tuple[LoadedModel, PreTrainedModel],
) -> None:
    loaded, _ = tiny
    cache = make_cache(SPECS[1], loaded, EVICT, NUM_TOKENS)
    assert isinstance(cache, NoRepositionCache)
    runner = ModelRunner(loaded)
    runner.forward([(cache, list(range(10)), [0] * 10)])
    runner.forward([(cache, list(range(9)), [0] * 9)])  # larger than the room left
    # 19 tokens for a 16-token cache: make_room evicted one block of 4.
    assert cache.positions() == [0, 1] + list(range(6, 19))
    cache.truncate(10)
    assert cache.slot_positions(10, 12).tolist() == [14, 15]
    runner.forward([(cache, [1, 2], [0, 0])])
    assert cache.positions() == [0, 1] + list(range(6, 16))


def test_dense_matches_the_library_model(
    tiny: tuple[LoadedModel, PreTrainedModel], token_ids: list[int]
) -> None:
    loaded, reference = tiny
    chunked, _ = stream_nll(
        loaded, token_ids, [CacheSpec.parse("dense")], dense_chunk=7, progress=False
    )
    with torch.inference_mode():
        logits = reference(torch.tensor([token_ids])).logits[0].float()  # [T, V]
    expected = torch.nn.functional.cross_entropy(
        logits[:-1], torch.tensor(token_ids[1:]), reduction="none"
    )
    np.testing.assert_allclose(
        chunked["dense"][1:], expected.double().numpy(), atol=TOLERANCE
    )
