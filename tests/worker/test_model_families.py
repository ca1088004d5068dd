"""Rotary families beyond Llama, rope variants, and models that are refused."""

from __future__ import annotations

import pytest

from tests.conftest import build_tiny
from tests.worker.test_engine import assert_greedy_matches_generate
from worker.engine import Engine, EngineConfig
from worker.rotary import UnsupportedModelError
from worker.session import SamplingParams

ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "rope_theta": 500000.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    # yarn scales q and k by an attention factor besides rotating them.
    "yarn": {
        "rope_type": "yarn",
        "factor": 16.0,
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 256,
    },
}

CASES = [
    ("llama", {}),
    ("qwen2", {}),
    ("mistral", {}),
    ("qwen3", {}),
    *(("llama", {"rope_parameters": rope}) for rope in ROPE_VARIANTS.values()),
]


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    CASES,
    ids=["llama", "qwen2", "mistral", "qwen3", *ROPE_VARIANTS],
)
def test_family_matches_generate(tokenizer, model_type, overrides):
    loaded, reference = build_tiny(tokenizer, model_type, **overrides)
    engine = Engine(loaded, EngineConfig())
    session = engine.open_session(None, SamplingParams(max_new_tokens=8))
    assert_greedy_matches_generate(engine, session, reference, 8)


@pytest.mark.parametrize(
    ("model_type", "overrides", "reason"),
    [
        ("gpt2", {}, "not supported"),  # learned absolute positions
        ("phi3", {"partial_rotary_factor": 0.5}, "not supported"),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "dynamic",
                    "factor": 2.0,
                    "rope_theta": 1e4,
                }
            },
            "depend on",
        ),
    ],
    ids=["gpt2-no-rotary", "phi3-partial-rotary", "dynamic-rope"],
)
def test_unpositionable_models_are_refused(tokenizer, model_type, overrides, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        build_tiny(tokenizer, model_type, **overrides)
