"""Sessions outlive their worker: kill, drain, offload, Redis outages."""

from __future__ import annotations

import asyncio
import copy
import uuid
from contextlib import AsyncExitStack

import grpc
import pytest
from pytest_redis import factories

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation, RequestRefused
from services.directory import RedisDirectory
from services.embedded import gateway_node, worker_node
from services.snapshot_store import RedisSnapshotStore
from tests.conftest import restart_redis
from tests.worker.test_engine import run_turn
from worker.engine import Engine, EngineConfig
from worker.model import prepare_model
from worker.persistence import PersistenceConfig
from worker.session import SamplingParams, TokenEvent

failover_redis = factories.redis_proc(port=None)
QUESTIONS = ["First question", "Second one", "Third", "Fourth and last"]
SAMPLING = pb.SamplingParams(max_new_tokens=8)


def url_of(proc) -> str:
    return f"redis://{proc.host}:{proc.port}/0"


def twin_engine(tiny, tokenizer) -> Engine:
    """An engine on an exact copy of the tiny model's weights."""
    _, reference = tiny
    loaded = prepare_model(copy.deepcopy(reference), tokenizer, max_positions=4096)
    return Engine(loaded, EngineConfig(window_size=200))


def reference_replies(tiny, tokenizer, count: int) -> list[list[int]]:
    """Greedy replies of a session that never moves."""
    engine = twin_engine(tiny, tokenizer)
    session = engine.open_session(None, SamplingParams(max_new_tokens=8))
    replies = []
    for question in QUESTIONS[:count]:
        events = run_turn(engine, session, question)
        replies.append([e.token_id for e in events if isinstance(e, TokenEvent)])
    return replies


class Cluster:
    """A gateway and two workers sharing Redis, in this process."""

    def __init__(self, tiny, tokenizer, url: str, offload_after_s: float | None = None):
        self.tiny, self.tokenizer, self.url = tiny, tokenizer, url
        self.namespace = f"test-{uuid.uuid4().hex[:8]}"
        self.offload_after_s = offload_after_s
        self.exits = AsyncExitStack()

    async def __aenter__(self) -> Cluster:
        self.directory = RedisDirectory(self.url, namespace=self.namespace)
        self.nodes = {}
        for name in ("a", "b"):
            store = RedisSnapshotStore(
                self.url, namespace=self.namespace, timeout_s=1.0
            )
            self.exits.push_async_callback(store.close)
            node = await self.exits.enter_async_context(
                worker_node(
                    twin_engine(self.tiny, self.tokenizer),
                    self.directory,
                    worker_id=name,
                    store=store,
                    persistence_config=PersistenceConfig(
                        offload_after_s=self.offload_after_s, offload_check_s=0.2
                    ),
                    drain_grace_s=2,
                )
            )
            self.nodes[name] = node
        self.address, self.gateway = await self.exits.enter_async_context(
            gateway_node(self.directory)
        )
        self.channel = grpc.aio.insecure_channel(self.address)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.exits.aclose()
        await self.directory.close()

    async def flushed(self) -> None:
        """Wait for every background snapshot write."""
        for node in self.nodes.values():
            if node.persistence is not None:
                while node.persistence._tasks:
                    await asyncio.sleep(0.01)


async def ask(conversation: Conversation, text: str) -> list[pb.ServerMessage]:
    return [m async for m in conversation.ask(text)]


def tokens(messages) -> list[int]:
    return [m.token.token_id for m in messages if m.WhichOneof("kind") == "token"]


async def open_sessions(cluster: Cluster, count: int, turns: int):
    conversations = []
    for _ in range(count):
        conversation = Conversation(cluster.channel)
        await conversation.open(sampling=SAMPLING)
        for question in QUESTIONS[:turns]:
            await ask(conversation, question)
        conversations.append(conversation)
    await cluster.flushed()
    return conversations


@pytest.fixture()
def url(failover_redis) -> str:
    return url_of(failover_redis)


async def test_killed_worker_sessions_continue_elsewhere_identically(
    tiny, tokenizer, url
):
    expected = reference_replies(tiny, tokenizer, 4)
    async with Cluster(tiny, tokenizer, url) as cluster:
        conversations = await open_sessions(cluster, 4, turns=2)
        on_a = [c for c in conversations if c.opened.worker_id == "a"]
        assert on_a and len(on_a) < 4, "placement spreads sessions over both workers"
        await cluster.nodes["a"].kill()
        for conversation in conversations:
            moved = conversation.opened.worker_id == "a"
            messages = await ask(conversation, QUESTIONS[2])
            if moved:
                assert messages[0].WhichOneof("kind") == "moved"
                assert messages[0].moved.worker_id == "b"
                assert not messages[0].moved.turn_lost
            assert tokens(messages) == expected[2]
            assert tokens(await ask(conversation, QUESTIONS[3])) == expected[3]
        engine_b = cluster.nodes["b"].engine
        assert len(engine_b.sessions) == 4
        assert engine_b.metrics.restores._value.get() == len(on_a)


async def test_a_turn_in_flight_when_the_worker_dies_is_reported_lost(
    tiny, tokenizer, url
):
    expected = reference_replies(tiny, tokenizer, 3)
    async with Cluster(tiny, tokenizer, url) as cluster:
        conversation = Conversation(cluster.channel)
        opened = await conversation.open(sampling=pb.SamplingParams(max_new_tokens=8))
        await ask(conversation, QUESTIONS[0])
        await ask(conversation, QUESTIONS[1])
        await cluster.flushed()
        node = cluster.nodes[opened.worker_id]
        # A long reply, and the kill only once part of it reached the client:
        # the next worker cannot continue a reply it never saw, so the turn
        # is lost. (A turn whose reply had not begun is answered afresh.)
        await conversation.send(
            pb.ClientMessage(
                user_turn=pb.UserTurn(text="Lost turn", max_new_tokens=500)
            )
        )
        first = await asyncio.wait_for(conversation._read(), 30)
        assert first.WhichOneof("kind") == "token"
        await node.kill()
        moved = None
        async for message in conversation.events():
            if message.WhichOneof("kind") == "moved":
                moved = message.moved
                break
        assert moved.turn_lost and moved.num_turns == 2
        assert tokens(await ask(conversation, QUESTIONS[2])) == expected[2]


async def test_drained_worker_hands_its_sessions_over(tiny, tokenizer, url):
    expected = reference_replies(tiny, tokenizer, 3)
    async with Cluster(tiny, tokenizer, url) as cluster:
        conversations = await open_sessions(cluster, 3, turns=2)
        node = cluster.nodes["a"]
        await node.drain(cluster.directory, grace_s=2)
        for conversation in conversations:
            messages = await ask(conversation, QUESTIONS[2])
            assert tokens(messages) == expected[2]
        assert [w.worker_id for w in await cluster.directory.live_workers()] == ["b"]


async def test_idle_sessions_are_offloaded_and_restored_on_their_next_turn(
    tiny, tokenizer, url
):
    expected = reference_replies(tiny, tokenizer, 3)
    async with Cluster(tiny, tokenizer, url, offload_after_s=0.3) as cluster:
        conversation = Conversation(cluster.channel)
        opened = await conversation.open(sampling=SAMPLING)
        await ask(conversation, QUESTIONS[0])
        await ask(conversation, QUESTIONS[1])
        await conversation.detach()
        engine = cluster.nodes[opened.worker_id].engine
        for _ in range(50):
            if opened.session_id not in engine.sessions:
                break
            await asyncio.sleep(0.1)
        assert opened.session_id not in engine.sessions, "offloaded"
        resumed = Conversation(cluster.channel)
        reopened = await resumed.resume(opened.session_id)
        assert reopened.num_turns == 2
        assert tokens(await ask(resumed, QUESTIONS[2])) == expected[2]
        await resumed.close()


async def test_redis_outage_spares_live_sessions(tiny, tokenizer, failover_redis):
    async with Cluster(tiny, tokenizer, url_of(failover_redis)) as cluster:
        conversation = Conversation(cluster.channel)
        await conversation.open(sampling=SAMPLING)
        await ask(conversation, QUESTIONS[0])
        failover_redis.stop()
        try:
            # The live session keeps going; its snapshots fail and are counted.
            messages = await ask(conversation, QUESTIONS[1])
            assert messages[-1].turn_end.turn == 2
            with pytest.raises(RequestRefused) as caught:
                await Conversation(cluster.channel).open(sampling=SAMPLING)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert "directory unavailable" in caught.value.message
            await cluster.flushed()  # the snapshot writes fail while it is down
        finally:
            restart_redis(failover_redis)
        failures = sum(
            n.engine.metrics.snapshot_failures._value.get()
            for n in cluster.nodes.values()
        )
        assert failures >= 1
        # Redis is back (empty): workers re-register on their next beat or,
        # here, explicitly; new sessions are placed again.
        for name, node in cluster.nodes.items():
            from services.directory import WorkerInfo

            await cluster.directory.register_worker(
                WorkerInfo(name, node.address), None
            )
        fresh = Conversation(cluster.channel)
        await fresh.open(sampling=SAMPLING)
        assert (await ask(fresh, QUESTIONS[0]))[-1].turn_end.turn == 1


async def test_a_turn_sent_as_its_worker_dies_is_delivered_elsewhere(
    tiny, tokenizer, url
):
    """The turn races the gateway noticing the loss; it must never vanish."""
    expected = reference_replies(tiny, tokenizer, 3)
    for _ in range(3):
        async with Cluster(tiny, tokenizer, url) as cluster:
            conversation, node = await two_turns_in(cluster)
            # The turn goes out in the same instant as the kill.
            kill = asyncio.create_task(node.kill())
            await conversation.send(
                pb.ClientMessage(user_turn=pb.UserTurn(text=QUESTIONS[2]))
            )
            await kill
            before = []
            while message := await asyncio.wait_for(conversation._read(), 30):
                before.append(message)
                if message.WhichOneof("kind") == "moved":
                    break
            moved = before.pop().moved
            if any(m.WhichOneof("kind") == "turn_end" for m in before):
                messages = before  # answered before the worker went
            elif moved.num_turns == 3:
                # Answered and snapshotted, but the end of the reply was cut.
                assert not moved.turn_lost
                assert expected[2][: len(tokens(before))] == tokens(before)
                continue
            elif moved.turn_lost:
                # Part of the reply had arrived: the client sends the turn again.
                messages = await asyncio.wait_for(
                    _collect(conversation.ask(QUESTIONS[2])), 30
                )
            else:
                assert not tokens(before), "a reply that began is not replayed"
                messages = await asyncio.wait_for(_collect(conversation.reply()), 30)
            assert tokens(messages) == expected[2]


async def two_turns_in(cluster: Cluster):
    """A session with two answered turns, snapshotted; and its worker."""
    conversation = Conversation(cluster.channel)
    opened = await conversation.open(sampling=SAMPLING)
    for question in QUESTIONS[:2]:
        await ask(conversation, question)
    await cluster.flushed()
    return conversation, cluster.nodes[opened.worker_id]


async def _collect(messages) -> list[pb.ServerMessage]:
    return [m async for m in messages]


async def test_a_turn_whose_reply_had_not_begun_is_answered_by_the_next_worker(
    tiny, tokenizer, url
):
    expected = reference_replies(tiny, tokenizer, 4)
    async with Cluster(tiny, tokenizer, url) as cluster:
        conversation, node = await two_turns_in(cluster)
        opened = conversation.opened
        # The worker takes the turn but its engine never runs it: the turn is
        # in flight on the worker, and not one token of its reply exists.
        node.engine.stop()
        await conversation.send(
            pb.ClientMessage(user_turn=pb.UserTurn(text=QUESTIONS[2]))
        )
        session = node.engine.sessions[opened.session_id]
        for _ in range(500):
            if session.busy:
                break
            await asyncio.sleep(0.01)
        assert session.busy, "the worker never received the turn"
        await node.kill()
        messages = await asyncio.wait_for(_collect(conversation.reply()), 30)
        assert messages[0].WhichOneof("kind") == "moved"
        assert not messages[0].moved.turn_lost
        assert messages[0].moved.num_turns == 2
        assert tokens(messages) == expected[2]
        assert tokens(await ask(conversation, QUESTIONS[3])) == expected[3]


async def test_gateways_share_sessions_through_redis(tiny, tokenizer, url):
    """Gateways hold no session state: a session opened through one gateway
    resumes through another on the same worker and replies as if it never
    changed gateway; resuming through the second while the first stream is
    still attached ends the first stream; after its worker dies, the second
    gateway moves it."""
    expected = reference_replies(tiny, tokenizer, 4)
    async with Cluster(tiny, tokenizer, url) as cluster:
        directory = RedisDirectory(url, namespace=cluster.namespace)
        cluster.exits.push_async_callback(directory.close)
        async with (
            gateway_node(directory) as (address, _),
            grpc.aio.insecure_channel(address) as second_gateway,
        ):
            first = Conversation(cluster.channel)
            opened = await first.open(sampling=SAMPLING)
            assert tokens(await ask(first, QUESTIONS[0])) == expected[0]

            second = Conversation(second_gateway)
            resumed = await second.resume(opened.session_id)
            assert resumed.worker_id == opened.worker_id
            assert resumed.num_turns == 1
            with pytest.raises(RequestRefused) as caught:
                async for _ in first.events():
                    pass
            assert caught.value.code == grpc.StatusCode.ABORTED
            assert tokens(await ask(second, QUESTIONS[1])) == expected[1]

            await cluster.flushed()
            await cluster.nodes[opened.worker_id].kill()
            messages = await ask(second, QUESTIONS[2])
            assert messages[0].WhichOneof("kind") == "moved"
            assert not messages[0].moved.turn_lost
            assert tokens(messages) == expected[2]
            await second.detach()

            # Back through the first gateway, to the worker the second chose.
            again = Conversation(cluster.channel)
            back = await again.resume(opened.session_id)
            assert back.worker_id == messages[0].moved.worker_id
            assert tokens(await ask(again, QUESTIONS[3])) == expected[3]
            await again.close()


async def test_a_late_interruption_after_a_move_cuts_the_reply(tiny, tokenizer, url):
    """The listener barges in on a reply that finished generating while it
    still plays, after the session's worker died: the next worker cuts the
    reply to what was heard, and the conversation goes on from the cut as
    it would have on a worker that never died."""
    async with Cluster(tiny, tokenizer, url) as cluster:
        conversation = Conversation(cluster.channel)
        opened = await conversation.open(sampling=SAMPLING)
        first = tokens(await ask(conversation, QUESTIONS[0]))
        assert len(first) > 3
        await cluster.flushed()
        await cluster.nodes[opened.worker_id].kill()
        await conversation.interrupt(heard_tokens=3)
        kinds = []
        async for message in conversation.events():
            kinds.append(message.WhichOneof("kind"))
            if message.WhichOneof("kind") == "interrupted":
                cut = message.interrupted
                break
        assert kinds == ["moved", "interrupted"]
        assert (cut.turn, cut.num_kept, cut.num_rolled_back) == (1, 3, len(first) - 3)
        after_move = tokens(await ask(conversation, QUESTIONS[1]))
        await conversation.close()

    # The same cut on a worker that stays up.
    engine = twin_engine(tiny, tokenizer)
    session = engine.open_session(None, SamplingParams(max_new_tokens=8))
    run_turn(engine, session, QUESTIONS[0])
    engine.interrupt(session.session_id, heard_tokens=3)
    events = run_turn(engine, session, QUESTIONS[1])
    assert after_move == [e.token_id for e in events if isinstance(e, TokenEvent)]


async def test_closing_a_session_deletes_its_snapshot_even_mid_write(
    tiny, tokenizer, url, monkeypatch
):
    """The close arrives while the snapshot of the turn just answered is
    still being written (slowed here): the snapshot must not land after
    the delete."""
    put = RedisSnapshotStore.put

    async def slow_put(self, session_id, blob):
        await asyncio.sleep(0.3)
        return await put(self, session_id, blob)

    monkeypatch.setattr(RedisSnapshotStore, "put", slow_put)
    async with Cluster(tiny, tokenizer, url) as cluster:
        conversation = Conversation(cluster.channel)
        opened = await conversation.open(sampling=SAMPLING)
        await ask(conversation, QUESTIONS[0])
        await conversation.close()  # SessionClosed: the snapshot is gone
        store = cluster.nodes[opened.worker_id].persistence.store
        assert await store.get(opened.session_id) is None
        await cluster.flushed()
        await asyncio.sleep(0.5)  # past any write that was still on its way
        assert await store.get(opened.session_id) is None


async def test_an_interrupt_its_worker_took_but_never_applied_is_sent_again(
    tiny, tokenizer, url, monkeypatch
):
    """The worker dies after the gateway's write of an interrupt succeeded
    but before the worker acted on it: after the move, the next worker gets
    the interrupt again and cuts the reply."""
    from worker.server import WorkerServicer

    handle = WorkerServicer._handle
    dying = {}

    def die_on_interrupt(self, session, message, interrupts):
        if message.WhichOneof("kind") == "interrupt" and self.worker_id in dying:
            asyncio.ensure_future(dying.pop(self.worker_id).kill())
            return None  # taken off the wire, never acted on
        return handle(self, session, message, interrupts)

    monkeypatch.setattr(WorkerServicer, "_handle", die_on_interrupt)
    async with Cluster(tiny, tokenizer, url) as cluster:
        conversation = Conversation(cluster.channel)
        opened = await conversation.open(sampling=SAMPLING)
        first = tokens(await ask(conversation, QUESTIONS[0]))
        await conversation.ack(5)
        await cluster.flushed()
        dying[opened.worker_id] = cluster.nodes[opened.worker_id]
        await conversation.interrupt(heard_tokens=3)
        kinds, cut = [], None
        async with asyncio.timeout(30):  # without the resend, nothing comes
            async for message in conversation.events():
                kinds.append(message.WhichOneof("kind"))
                if message.WhichOneof("kind") == "interrupted":
                    cut = message.interrupted
                    break
        assert kinds == ["moved", "interrupted"] and not dying
        assert (cut.turn, cut.num_kept, cut.num_rolled_back) == (1, 3, len(first) - 3)
        await conversation.close()
