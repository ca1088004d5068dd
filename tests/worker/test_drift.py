"""No drift: a million tokens later, every key sits exactly at its position."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.conftest import build_tiny
from worker.runner import ModelRunner
from worker.sink_cache import CacheShape, SinkCache

# Largest |rotated - exact| / (|exact| + 1) allowed per cache dtype. fp32 is
# round-off of one rotation; bf16 and fp16 are one rounding of the fp32 result
# (half an ulp: 2^-9 and 2^-12), plus the rotation's own round-off.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}


def stream(
    loaded, cache: SinkCache, num_tokens: int, chunk: int, start: int = 0
) -> None:
    runner = ModelRunner(loaded)
    fed = start
    num_tokens += start
    while fed < num_tokens:
        size = min(chunk, num_tokens - fed)
        token_ids = [(fed + i) * 7919 % 40000 + 100 for i in range(size)]
        runner.forward([(cache, token_ids, [fed // 1000 + 1] * size)])
        fed += size


def exact_rotation(loaded, raw: torch.Tensor) -> torch.Tensor:
    """fp32 rotation of the raw keys at 0..S-1 by the library's own rope."""
    raw32 = raw.float()
    positions = torch.arange(raw.shape[2])[None]
    rotary = type(loaded.model.model.rotary_emb)(config=loaded.model.config)
    cos, sin = rotary(raw32, positions)
    return apply_rotary_pos_emb(raw32, raw32, cos, sin)[0]


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((actual.float() - exact).abs() / (exact.abs() + 1)).max())


def tiniest(tokenizer):
    return build_tiny(
        tokenizer,
        num_hidden_layers=1,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
    )[0]


def test_a_million_tokens_through_the_model_without_drift(tokenizer):
    loaded = tiniest(tokenizer)
    shape = CacheShape(1, 1, 8, torch.float32, torch.device("cpu"))
    # Chunks of 992 evict a block of 32 before each pass (make_room); chunks
    # of 2,500 are attended in full and trimmed after (trim). Both paths run.
    cache = SinkCache(
        shape,
        loaded.rotary,
        sink_size=4,
        window_size=1020,
        evict_size=32,
        headroom=2500,
    )
    num_tokens = 1_000_000
    stream(loaded, cache, 5_000, chunk=992)
    stream(loaded, cache, num_tokens - 5_000, chunk=2500, start=5_000)

    assert cache.length == len(cache.token_ids) <= 1024
    assert cache.positions() == list(range(cache.length))
    assert cache.token_ids[:4] == [i * 7919 % 40000 + 100 for i in range(4)]
    last = [(num_tokens - 1 - i) * 7919 % 40000 + 100 for i in range(3)][::-1]
    assert cache.token_ids[-3:] == last
    error = relative_error(
        cache.rotated_keys(), exact_rotation(loaded, cache.raw_keys())
    )
    assert error <= TOLERANCE[torch.float32], error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_million_tokens_in_half_precision_without_drift(tokenizer, dtype):
    """The cache's own code path (make_room, write, append), fed synthetic
    keys: a bf16 model forward on a CPU would take minutes for no extra
    coverage of the positions."""
    loaded = tiniest(tokenizer)
    shape = CacheShape(2, 2, 8, dtype, torch.device("cpu"))
    cache = SinkCache(
        shape, loaded.rotary, sink_size=4, window_size=1020, evict_size=32
    )
    generator = torch.Generator().manual_seed(0)
    chunk = 992
    for _ in range(1_000_000 // chunk + 1):
        cache.make_room(chunk)
        for layer in range(shape.num_layers):
            keys = torch.randn(2, chunk, 8, generator=generator).to(dtype)
            cache.write(layer, cache.length, keys, keys)
        cache.append([0] * chunk, [1] * chunk)
    assert cache.positions() == list(range(cache.length))
    error = relative_error(
        cache.rotated_keys(), exact_rotation(loaded, cache.raw_keys())
    )
    assert error <= TOLERANCE[dtype], f"{dtype}: {error}"


def test_a_chain_of_rotations_would_drift_in_bf16(tokenizer):
    """The tolerance above is tight enough to catch the naive alternative:
    rotating already rotated keys by each eviction's position delta."""
    loaded = tiniest(tokenizer)
    raw = torch.randn(1, 2, 64, 8)
    exact = exact_rotation(loaded, raw)
    keys = exact.to(torch.bfloat16)
    # Shift every key forward by one and back by one, a thousand times: the
    # positions end where they began, the round-off does not.
    positions = torch.arange(64)[None]
    cos, sin = loaded.model.model.rotary_emb(raw, positions + 1)
    cos0, sin0 = loaded.model.model.rotary_emb(raw, positions)
    for _ in range(1000):
        # rotate by +1 then by -1 (rotation by -1 is the inverse: cos, -sin)
        delta_cos, delta_sin = cos[:, 1:2], sin[:, 1:2] - sin0[:, :1]
        keys = apply_rotary_pos_emb(
            keys, keys, delta_cos.bfloat16(), delta_sin.bfloat16()
        )[0]
        keys = apply_rotary_pos_emb(
            keys, keys, delta_cos.bfloat16(), -delta_sin.bfloat16()
        )[0]
    assert relative_error(keys, exact) > TOLERANCE[torch.bfloat16]
