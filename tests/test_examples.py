"""The examples run against a real stack, so they cannot silently rot."""

from __future__ import annotations

import argparse
import io

import pytest

from examples import barge_in_client
from services.embedded import embedded_stack
from worker.engine import Engine, EngineConfig


@pytest.mark.parametrize(("seed", "heard"), [(0, "ack"), (5, "tokens")])
async def test_barge_in_client_cuts_the_reply_where_it_stopped_playing(
    tiny, heard: str, seed: int
) -> None:
    loaded, _ = tiny
    args = barge_in_client.build_parser().parse_args(
        ["--tokens-per-s", "400", "--seed", str(seed), "--heard", heard]
        + ["--reply-tokens", "40"]
    )
    out = io.StringIO()
    async with embedded_stack(Engine(loaded, EngineConfig())) as stack:
        cut = await barge_in_client.talk(stack.gateway_address, args, out)
        # The example closed its session: nothing leaked.
        assert not stack.engine.sessions
    text = out.getvalue()
    # Whatever the random tiny model says, the cut keeps exactly what was
    # played: the reply text printed before the barge-in marker.
    played = text.split("bot> ", 1)[1].split(" <barge-in", 1)[0]
    assert cut.turn == 1
    assert cut.text == played
    assert f"{cut.num_kept} tokens played" in text
    assert not cut.clamped and cut.num_lost == 0
    assert "interrupted: kept" in text
    assert text.rstrip().count("bot> ") == 2


# The benchmarks are examples of driving the service too; a smoke run each on
# the tiny model keeps them from rotting between real runs.


@pytest.mark.network  # MT-Bench questions, fetched once
async def test_barge_in_benchmark_smoke(tiny) -> None:
    from benchmarks import barge_in

    loaded, _ = tiny
    args = argparse.Namespace(seed=1, interruptions=5, max_new_tokens=200)
    async with embedded_stack(Engine(loaded, EngineConfig())) as stack:
        measured = await barge_in.measure(stack.gateway_address, args)
    samples = measured["samples"]
    assert len(samples) == 5
    assert not [a for s in samples for a in s.anomalies]
    assert all(s.num_kept == s.heard_point for s in samples)


@pytest.mark.network  # Emma, fetched once
async def test_eager_prefill_benchmark_smoke(tiny) -> None:
    from benchmarks import eager_prefill

    loaded, _ = tiny
    engine = Engine(loaded, EngineConfig())
    text = eager_prefill.user_turn(engine.chat, 60)
    args = argparse.Namespace(reply_tokens=2, speed_up=200.0, words_per_partial=3)
    async with embedded_stack(engine) as stack:
        eager = await eager_prefill.measure(stack, text, True, args)
        baseline = await eager_prefill.measure(stack, text, False, args)
    assert eager.partials > 0 and baseline.partials == 0
    # Both fed the same tokens: growing partials revise nothing.
    assert eager.num_prefilled == baseline.num_prefilled
