"""Disconnects, queued turns and shutdowns."""

from __future__ import annotations

import asyncio

import grpc

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation
from services.embedded import embedded_stack
from worker.engine import Engine, EngineConfig
from worker.session import SamplingParams, SessionState


def test_a_turn_queued_behind_an_interruption_never_starts_after_a_cancel(tiny):
    loaded, _ = tiny
    engine = Engine(loaded, EngineConfig(prefill_chunk_size=8))
    session = engine.open_session(None, SamplingParams(max_new_tokens=5))
    engine.submit_turn(session.session_id, "a question long enough to need chunks")
    engine.step()
    engine.interrupt(session.session_id, heard_tokens=0)  # applied after prefill
    engine.submit_turn(session.session_id, "queued behind the cut")
    engine.cancel_turn(session.session_id)  # the client went away
    for _ in range(20):
        engine.step()
    assert session.state is SessionState.IDLE
    assert session.queued_turn is None
    assert session.num_turns == 0


async def test_shutdown_is_not_an_interruption(tiny):
    loaded, _ = tiny
    engine = Engine(loaded, EngineConfig())
    async with embedded_stack(engine) as stack:
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            conversation = Conversation(channel)
            opened = await conversation.open(
                sampling=pb.SamplingParams(max_new_tokens=500)
            )
            await conversation.send(pb.ClientMessage(user_turn=pb.UserTurn(text="Go")))
            received = []
            async for message in conversation.events():
                if message.WhichOneof("kind") == "token":
                    received.append(message.token.token_id)
                if len(received) == 5:
                    break
    # The servers are gone; the session saw its stream cancelled, not cut.
    session = engine.sessions[opened.session_id]
    await asyncio.sleep(0.1)
    registry = engine.metrics.registry
    for kind in ("tokens", "chars", "acked"):
        labels = {"kind": kind}
        assert (
            registry.get_sample_value("sinkserve_worker_interruptions_total", labels)
            is None
        )
    assert engine.metrics.tokens_rolled_back._value.get() == 0
    turn = session.turn or session.last_turn
    assert turn.reply_ids[: len(received)] == received
