"""200 random barge-ins against the real service over gRPC."""

from __future__ import annotations

import random

import grpc
import pytest

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation
from services.embedded import embedded_stack
from worker.engine import Engine, EngineConfig


@pytest.fixture()
async def stack(tiny):
    loaded, _ = tiny
    config = EngineConfig(window_size=1000, prefill_chunk_size=64)
    async with embedded_stack(Engine(loaded, config)) as running:
        yield running


def assert_holds(stack, session_id: str, heard_history: list[int]) -> None:
    """The session holds the heard history: its pinned head and, once the
    window has slid, its newest tokens."""
    session = stack.engine.sessions[session_id]
    got = session.cache.token_ids + [t for t, _ in session.pending]
    pinned = session.cache.num_pinned
    assert got[:pinned] == heard_history[:pinned]
    tail = len(got) - pinned
    assert got[pinned:] == heard_history[len(heard_history) - tail :]


async def test_random_interruptions_keep_exactly_what_was_heard(stack):
    rng = random.Random(1234)
    engine = stack.engine
    chat = engine.chat
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        conversation = Conversation(channel)
        await conversation.open(sampling=pb.SamplingParams(max_new_tokens=24))
        session_id = conversation.session_id
        # What the listener believes the session holds.
        heard_history = chat.system_tokens(None)
        closed = True
        first = True
        together = False  # the previous round sent this turn with its interrupt
        pending_turn = f"question {rng.random()}"
        for _ in range(200):
            increment = chat.user_tokens(pending_turn, first, closed)
            first = False
            if not together:
                await conversation.send(
                    pb.ClientMessage(user_turn=pb.UserTurn(text=pending_turn))
                )
            heard_history += increment
            wait_for = rng.randint(0, 10)
            received = []
            turn_end = None
            async for message in conversation.events():
                kind = message.WhichOneof("kind")
                if kind == "token":
                    received.append(message.token.token_id)
                if kind == "turn_end":
                    turn_end = message.turn_end
                    break
                if len(received) >= wait_for:
                    break
            heard = rng.randint(0, len(received) + 2)
            together = rng.random() < 0.5
            pending_turn = f"question {rng.random()}"
            await conversation.interrupt(heard_tokens=heard)
            if together:  # the next turn in the same batch of writes
                await conversation.send(
                    pb.ClientMessage(user_turn=pb.UserTurn(text=pending_turn))
                )
            interrupted = None
            while interrupted is None:
                message = await anext(conversation.events())
                kind = message.WhichOneof("kind")
                if kind == "token":
                    received.append(message.token.token_id)
                elif kind == "interrupted":
                    interrupted = message.interrupted
                elif kind == "turn_end":
                    turn_end = message.turn_end
            if turn_end is None or turn_end.reason == pb.END_REASON_INTERRUPTED:
                if turn_end is None:  # the TurnEnd of the cut reply follows
                    message = await anext(conversation.events())
                    assert message.turn_end.reason == pb.END_REASON_INTERRUPTED
            kept = min(heard, len(received))
            assert interrupted.num_kept == kept
            heard_history += received[:kept]
            ended_whole = turn_end is not None and turn_end.reason == pb.END_REASON_STOP
            closed = ended_whole and heard >= len(received)
            if closed:
                heard_history.append(chat.end_of_turn_ids[0])
            if not together:
                assert_holds(stack, session_id, heard_history)
        await conversation.close()
