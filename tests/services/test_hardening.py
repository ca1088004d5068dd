"""Misuse found by trying to break the service, kept from coming back."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation, RequestRefused
from services.embedded import embedded_stack
from worker.engine import Engine, EngineConfig
from worker.errors import InvalidRequest, LimitExceeded, SessionBusy
from worker.session import SamplingParams


@pytest.fixture()
async def stack(tiny):
    loaded, _ = tiny
    async with embedded_stack(Engine(loaded, EngineConfig())) as running:
        yield running


def test_a_temperature_too_small_to_divide_by_is_refused(tiny):
    engine = Engine(tiny[0])
    with pytest.raises(InvalidRequest):
        engine.open_session(None, SamplingParams(temperature=1e-40))


def test_a_partial_after_the_final_text_is_refused(tiny):
    engine = Engine(tiny[0])
    session = engine.open_session(None, SamplingParams(max_new_tokens=3))
    engine.partial_turn(session.session_id, "Hello there", final=True)
    with pytest.raises(SessionBusy):
        engine.partial_turn(session.session_id, "Hello", final=False)
    with pytest.raises(SessionBusy):
        engine.submit_turn(session.session_id, "Hello again")
    while session.busy:
        engine.step()
    assert session.num_turns == 1


def test_absurdly_long_texts_are_refused_before_tokenizing(tiny):
    engine = Engine(tiny[0], EngineConfig(max_turn_tokens=100))
    session = engine.open_session(None, SamplingParams())
    with pytest.raises(LimitExceeded, match="characters"):
        engine.submit_turn(session.session_id, "x" * 10_000)
    with pytest.raises(LimitExceeded, match="characters"):
        engine.open_session("y" * 10_000, SamplingParams())


async def test_resuming_on_a_second_stream_ends_the_first(stack):
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        first = Conversation(channel)
        opened = await first.open(sampling=pb.SamplingParams(max_new_tokens=3))
        second = Conversation(channel)
        await second.resume(opened.session_id)
        with pytest.raises(RequestRefused) as caught:
            async for _ in first.events():
                pass
        assert caught.value.code == grpc.StatusCode.ABORTED
        messages = [m async for m in second.ask("Still here?")]
        assert messages[-1].turn_end.turn == 1


async def test_undecodable_input_gets_invalid_argument(stack):
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        call = channel.stream_stream(
            "/sinkserve.v1.Sessions/Converse",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ServerMessage.FromString,
        )()
        await call.write(b"\x1a\x03\x0a\x01\xff")  # user_turn with invalid UTF-8
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_generating_gauge_returns_to_zero(stack):
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        conversation = Conversation(channel)
        await conversation.open(sampling=pb.SamplingParams(max_new_tokens=5))
        [m async for m in conversation.ask("Hi")]
        await asyncio.sleep(0.1)
    assert stack.engine.metrics.generating_sessions._value.get() == 0


async def test_ending_the_stream_mid_streamed_turn_drops_that_turn(stack):
    """A client that stops writing while its streamed turn still waits for
    the final text can never send it: the stream ends, the unfinished turn
    is rolled back, and the session goes on from before it."""
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        first = Conversation(channel)
        opened = await first.open(sampling=pb.SamplingParams(max_new_tokens=3))
        [m async for m in first.ask("Hello")]
        session = stack.engine.sessions[opened.session_id]
        before = list(session.cache.token_ids)
        partial = pb.PartialUserTurn(text="I was going to say", final=False)
        await first.send(pb.ClientMessage(partial_user_turn=partial))
        await first._call.done_writing()
        rest = await asyncio.wait_for(_drain(first), timeout=10)
        assert [m.WhichOneof("kind") for m in rest] == ["turn_end"]
        assert rest[0].turn_end.reason == pb.END_REASON_CANCELLED

        second = Conversation(channel)
        resumed = await second.resume(opened.session_id)
        assert resumed.num_turns == 1
        assert session.cache.token_ids == before
        messages = [m async for m in second.ask("Still here?")]
        assert messages[-1].turn_end.turn == 2
        await second.close()


async def _drain(conversation: Conversation) -> list[pb.ServerMessage]:
    return [m async for m in conversation.events()]
