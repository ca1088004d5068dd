"""The CUDA path, on a GPU; skipped where there is none (CI has none)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_config
from tests.worker.test_decoder import step_both
from tests.worker.test_engine import assert_greedy_matches_generate
from worker.engine import Engine, EngineConfig
from worker.model import prepare_model
from worker.runner import ModelRunner
from worker.session import SamplingParams
from worker.sink_cache import SinkCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _tiny_on_cuda(tokenizer: object, dtype: torch.dtype) -> tuple:
    torch.manual_seed(0)
    config = tiny_config("llama", len(tokenizer))
    reference = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    served = copy.deepcopy(reference)
    loaded = prepare_model(served, tokenizer, device="cuda", max_positions=4096)
    return loaded, reference.cuda()


def test_greedy_on_cuda_matches_generate(tokenizer):
    loaded, reference = _tiny_on_cuda(tokenizer, torch.float32)
    assert loaded.decoder is not None and not loaded.decoder.lm_head.packed
    engine = Engine(loaded, EngineConfig(window_size=1020, prefill_chunk_size=7))
    session = engine.open_session(None, SamplingParams(max_new_tokens=12))
    assert_greedy_matches_generate(engine, session, reference, 12)
    assert session.cache.k_rot.device.type == "cuda"


def test_bf16_decoder_on_cuda_matches_the_library_forward(tokenizer):
    """Pooled decode steps through evictions, in bf16 on the GPU."""
    loaded, _ = _tiny_on_cuda(tokenizer, torch.bfloat16)
    ours, library = ModelRunner(loaded), ModelRunner(loaded, library_forward=True)
    engine = Engine(loaded)
    caches = [engine.open_session(None, SamplingParams()).cache for _ in range(2)]
    twins = [SinkCache(engine.cache_shape, loaded.rotary, 2, 12, 3) for _ in range(2)]
    for cache in caches:
        cache.window_size = cache.cache_size = 12  # evict within a few steps
    steps = [[[5, 6, 7, 8], [9, 10]], *[[[20 + i], [40 + i]] for i in range(14)]]
    step_both(ours, library, caches, twins, steps, tolerance=3e-2)
