"""The service over real gRPC on 127.0.0.1: gateway, worker, client."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation, RequestRefused
from services.embedded import embedded_stack
from tests.worker.test_engine import QUESTIONS, reference_replies
from worker.engine import Engine, EngineConfig


@pytest.fixture()
async def stack(tiny):
    loaded, reference = tiny
    config = EngineConfig(
        window_size=1020,
        max_window_size=2000,
        max_turn_tokens=200,
        prefill_chunk_size=16,
    )
    engine = Engine(loaded, config)
    async with embedded_stack(engine) as running:
        running.reference = reference
        yield running


@pytest.fixture()
async def channel(stack):
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        yield channel


async def ask(
    conversation: Conversation, text: str, **kwargs
) -> list[pb.ServerMessage]:
    return [m async for m in conversation.ask(text, **kwargs)]


def token_ids(messages: list[pb.ServerMessage]) -> list[int]:
    return [m.token.token_id for m in messages if m.WhichOneof("kind") == "token"]


async def test_greedy_through_gateway_matches_generate(stack, channel):
    conversation = Conversation(channel)
    await conversation.open(sampling=pb.SamplingParams(max_new_tokens=10))
    expected = reference_replies(stack.engine, stack.reference, QUESTIONS, 10)
    for question, want in zip(QUESTIONS, expected, strict=True):
        messages = await ask(conversation, question)
        assert token_ids(messages) == [t for t in want if t not in stack.engine.end_ids]
        assert messages[-1].turn_end.turn >= 1
    await conversation.close()


async def test_resume_on_a_new_stream_continues_the_session(stack, channel):
    first = Conversation(channel)
    opened = await first.open(sampling=pb.SamplingParams(max_new_tokens=4))
    await ask(first, "One")
    await first.detach()
    second = Conversation(channel)
    resumed = await second.resume(opened.session_id)
    assert resumed.resumed and resumed.num_turns == 1
    messages = await ask(second, "Two")
    assert messages[-1].turn_end.turn == 2
    assert messages[-1].turn_end.stats.num_reused > 0
    await second.close()


async def test_evictions_reach_the_client(stack, channel):
    conversation = Conversation(channel)
    await conversation.open(
        sampling=pb.SamplingParams(max_new_tokens=30), sink_size=4, window_size=40
    )
    notices = []
    for question in QUESTIONS:
        messages = await ask(conversation, question)
        notices += [m.eviction for m in messages if m.WhichOneof("kind") == "eviction"]
    assert notices
    assert all(n.num_evicted > 0 and n.cache_length <= 44 for n in notices)


async def expect_refused(awaitable, code: grpc.StatusCode) -> RequestRefused:
    with pytest.raises(RequestRefused) as caught:
        await awaitable
    assert caught.value.code == code, caught.value
    assert caught.value.message
    return caught.value


async def test_unknown_session_is_not_found(channel):
    await expect_refused(
        Conversation(channel).resume("no-such-session"), grpc.StatusCode.NOT_FOUND
    )


@pytest.mark.parametrize(
    ("open_kwargs", "code"),
    [
        (
            {"sampling": pb.SamplingParams(temperature=9.0)},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ({"sampling": pb.SamplingParams(top_p=-0.5)}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"sampling": pb.SamplingParams(top_k=-3)}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"window_size": 5000}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ({"sink_size": 500}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (
            {"system_prompt": "long " * 600, "window_size": 100},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ],
)
async def test_bad_opens_are_refused_and_leave_nothing(
    stack, channel, open_kwargs, code
):
    await expect_refused(Conversation(channel).open(**open_kwargs), code)
    assert stack.engine.sessions == {}


def session_state(stack, session_id: str) -> tuple:
    session = stack.engine.sessions[session_id]
    return (list(session.cache.token_ids), list(session.pending), session.num_turns)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("many words " * 150, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
async def test_bad_turns_are_refused_in_stream(stack, channel, text, code):
    conversation = Conversation(channel)
    await conversation.open(sampling=pb.SamplingParams(max_new_tokens=4))
    await ask(conversation, "One")
    before = session_state(stack, conversation.session_id)
    await expect_refused(ask(conversation, text), code)
    assert session_state(stack, conversation.session_id) == before
    # The stream and the session carry on.
    messages = await ask(conversation, "Two")
    assert messages[-1].turn_end.turn == 2


async def test_second_turn_while_generating_is_refused(stack, channel):
    conversation = Conversation(channel)
    await conversation.open(sampling=pb.SamplingParams(max_new_tokens=40))
    await conversation.send(pb.ClientMessage(user_turn=pb.UserTurn(text="First")))
    await conversation.send(pb.ClientMessage(user_turn=pb.UserTurn(text="Second")))
    received = []
    with pytest.raises(RequestRefused) as caught:
        async for message in conversation.events():
            received.append(message)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    # The first turn goes on to its end, untouched.
    rest = [m async for m in conversation.reply()]
    assert rest[-1].turn_end.turn == 1
    assert rest[-1].turn_end.stats.num_generated == 40
    assert stack.engine.sessions[conversation.session_id].num_turns == 1


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (
            pb.ClientMessage(interrupt=pb.Interrupt(heard_tokens=3)),
            "FAILED_PRECONDITION",
        ),
        (pb.ClientMessage(open=pb.OpenSession()), "INVALID_ARGUMENT"),
        (pb.ClientMessage(), "INVALID_ARGUMENT"),
    ],
    ids=["nothing-to-interrupt", "second-open", "empty-message"],
)
async def test_misplaced_messages_are_refused_in_stream(channel, message, code):
    conversation = Conversation(channel)
    await conversation.open()
    await conversation.send(message)
    with pytest.raises(RequestRefused) as caught:
        async for _ in conversation.events():
            pass
    assert caught.value.code.name == code


async def test_health_and_reflection(stack):
    for address in (stack.gateway_address, stack.worker_address):
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
            names = {s.name for s in responses[0].list_services_response.service}
            assert "sinkserve.v1.Sessions" in names
            assert "grpc.health.v1.Health" in names


async def test_metrics_count_and_never_name_a_session(stack, channel):
    conversation = Conversation(channel)
    await conversation.open(
        sampling=pb.SamplingParams(max_new_tokens=6), window_size=50
    )
    for question in QUESTIONS:
        await ask(conversation, question)
    metrics = stack.engine.metrics
    assert metrics.tokens_generated._value.get() == 18
    assert metrics.tokens_evicted._value.get() > 0
    assert metrics.ttft._sum.get() > 0
    text = generate_latest(metrics.registry).decode()
    text += generate_latest(stack.gateway.metrics.registry).decode()
    assert conversation.session_id not in text
    assert "sinkserve_worker_inter_token_latency_seconds_bucket" in text
    assert "sinkserve_gateway_tokens_relayed_total 18.0" in text


async def test_client_disconnect_stops_generation(stack, channel):
    conversation = Conversation(channel)
    opened = await conversation.open(sampling=pb.SamplingParams(max_new_tokens=2000))
    await conversation.send(
        pb.ClientMessage(user_turn=pb.UserTurn(text="Go on forever"))
    )
    async for message in conversation.events():
        if message.WhichOneof("kind") == "token":
            break
    conversation.cancel()
    session = stack.engine.sessions[opened.session_id]
    for _ in range(100):
        if not session.busy:
            break
        await asyncio.sleep(0.05)
    assert not session.busy
    assert session.num_turns == 1
