"""Shared fixtures: the SmolLM2 tokenizer and model, tiny random models."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from worker.model import LoadedModel, prepare_model, resolve_model


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "network: needs the package registries (PyPI, Debian) to run"
    )


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The converted SmolLM2 folder (converted once, then cached)."""
    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path: Path) -> object:
    return AutoTokenizer.from_pretrained(smollm2_path)


def tiny_config(model_type: str, vocab_size: int, **overrides: object) -> object:
    """A small config of a rotary family, big enough to be non-trivial."""
    from transformers import AutoConfig

    base = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "initializer_range": 0.25,
        "tie_word_embeddings": True,
    }
    if model_type == "qwen3":
        base["head_dim"] = 16
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def build_tiny(
    tokenizer: object, model_type: str = "llama", seed: int = 0, **overrides: object
) -> tuple[LoadedModel, PreTrainedModel]:
    """A random tiny model ready for sinkserve, and an untouched twin.

    The twin keeps the library's own attention, as the reference.
    """
    torch.manual_seed(seed)
    config = tiny_config(model_type, len(tokenizer), **overrides)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    served = copy.deepcopy(reference)
    loaded = prepare_model(
        served, tokenizer, max_positions=4096, name=f"tiny-{model_type}"
    )
    return loaded, reference


@pytest.fixture()
def tiny(tokenizer: object) -> tuple[LoadedModel, PreTrainedModel]:
    return build_tiny(tokenizer)


@pytest.fixture(scope="session")
def real_model(smollm2_path: Path) -> LoadedModel:
    from worker.model import load_model

    return load_model(smollm2_path)


def restart_redis(proc: object, attempts: int = 5) -> None:
    """Start a stopped pytest-redis server again, and wait until it answers.

    A restart on the same port can lose the race for the port to the old
    process's exit; then the new server dies at once. Try again until a PING
    gets through.
    """
    import time

    import redis

    for _ in range(attempts):
        try:
            proc.start()
        except Exception:  # the executor's own start-up check gave up
            pass
        client = redis.Redis(host=proc.host, port=proc.port, socket_timeout=1)
        try:
            for _ in range(20):
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.1)
        finally:
            client.close()
        proc.stop()
        time.sleep(0.5)
    raise RuntimeError(f"redis on port {proc.port} did not come back")
