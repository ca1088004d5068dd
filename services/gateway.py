"""The gateway: places sessions on workers and relays their streams.

It keeps no conversation state. A new session goes to the live worker with
the most free slots, and its affinity is written to the directory only once
that worker has accepted it; every later stream of the session is routed by
that entry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from protos.sinkserve.v1 import sinkserve_pb2_grpc as pb_grpc
from services import rpc
from services.directory import DirectoryUnavailable, SessionDirectory, WorkerInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        prefix = "sinkserve_gateway"
        self.streams = Gauge(
            f"{prefix}_active_streams", "Open client streams.", registry=r
        )
        self.sessions_opened = Counter(
            f"{prefix}_sessions_opened_total",
            "Sessions placed on a worker.",
            registry=r,
        )
        self.sessions_moved = Counter(
            f"{prefix}_sessions_moved_total",
            "Sessions moved to another worker after theirs died or drained.",
            registry=r,
        )
        self.tokens_relayed = Counter(
            f"{prefix}_tokens_relayed_total",
            "Token deltas relayed to clients.",
            registry=r,
        )
        self.evictions_relayed = Counter(
            f"{prefix}_evictions_relayed_total", "Eviction notices relayed.", registry=r
        )
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds",
            "From relaying a user turn to relaying its first token.",
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.itl = Histogram(
            f"{prefix}_inter_token_latency_seconds",
            "Between consecutive relayed tokens of a reply.",
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.failures = Counter(
            f"{prefix}_stream_failures_total",
            "Streams ended with an error status, by code.",
            ["code"],
            registry=r,
        )


class _Relay:
    """State of one relayed stream: timing for the histograms, and what a
    move to another worker needs to know."""

    def __init__(self) -> None:
        self.turn_sent_s: float | None = None
        self.last_token_s: float | None = None
        self.session_id: str | None = None
        self.turn_open = False  # a user turn was sent and has not ended
        self.client_done = False
        self.moving = False  # re-attaching after the worker was lost
        self.attached = False  # the client has had its SessionOpened
        self.bad_input: str | None = None  # the client sent an undecodable message
        self.rerouted = False  # the first resume went to a new worker
        # Client messages taken from the inbox and not yet written to the
        # worker; after a move, the next worker gets them first, in order.
        self.outbox: list[object] = []
        self.turn_message: pb.ClientMessage | None = None  # the open user turn
        self.reply_started = False  # some of its reply reached the client
        self.reply_turn: int | None = None  # the turn number of that reply
        # Interrupts, acks and closes written to this worker since the last
        # turn began: a worker can die after a write succeeded but before it
        # acted, so after a move the next worker gets them again (each is
        # harmless twice: the same cut again keeps what it kept).
        self.replay: list[pb.ClientMessage] = []


# Worker-side failures that mean the worker is gone or going: move the session.
_WORKER_LOST = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}
_CLIENT_DONE = object()
_REPLAYED = {"interrupt", "ack", "close"}
_REPLAY_LIMIT = 64


async def _read_client(
    request_iterator: AsyncIterator[pb.ClientMessage],
    inbox: asyncio.Queue[object],
    relay: _Relay,
) -> None:
    try:
        async for message in request_iterator:
            inbox.put_nowait(message)
    except grpc.aio.AioRpcError:
        pass
    except Exception as error:  # undecodable input: the call ends with a status
        relay.bad_input = f"bad message: {error}"
    inbox.put_nowait(_CLIENT_DONE)


async def _pump(
    inbox: asyncio.Queue[object], call: grpc.aio.StreamStreamCall, relay: _Relay
) -> None:
    """Client to worker, until the client half-closes.

    A message leaves `relay.outbox` only once its write succeeded, so one
    whose write failed with the worker is not lost: the pump of the next
    worker sends it first.
    """
    try:
        while True:
            if not relay.outbox:
                relay.outbox.append(await inbox.get())
            message = relay.outbox[0]
            if message is _CLIENT_DONE:
                break
            kind = message.WhichOneof("kind")
            starts_turn = kind == "user_turn" or (
                kind == "partial_user_turn" and message.partial_user_turn.final
            )
            was_open = relay.turn_open
            if starts_turn:
                relay.turn_sent_s = time.perf_counter()
                relay.last_token_s = None
                relay.turn_open = True  # before the write: replies may follow fast
                relay.reply_started = False
                relay.reply_turn = None
                relay.turn_message = message if kind == "user_turn" else None
            try:
                await call.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                relay.turn_open = was_open  # the lost worker never had it
                raise
            relay.outbox.pop(0)
            if starts_turn:
                relay.replay = []
            elif kind in _REPLAYED:
                if kind == "ack":  # only the newest ack counts
                    relay.replay = [m for m in relay.replay if not m.HasField("ack")]
                relay.replay = [*relay.replay[-(_REPLAY_LIMIT - 1) :], message]
        # The end of the client's messages stays queued: after a move, the
        # next worker is told at once that the client is done writing.
        relay.client_done = True
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the worker side ended; the relay loop reports it


class GatewayServicer(pb_grpc.SessionsServicer):
    def __init__(
        self,
        directory: SessionDirectory,
        metrics: GatewayMetrics | None = None,
        load_timeout_s: float = 2.0,
    ):
        self.directory = directory
        self.metrics = metrics or GatewayMetrics()
        self.load_timeout_s = load_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def _directory(self, operation: Awaitable[T]) -> T:
        """Run a directory call; its failure is UNAVAILABLE, said plainly."""
        try:
            return await operation
        except DirectoryUnavailable as error:
            raise _Refusal(
                grpc.StatusCode.UNAVAILABLE, f"session directory unavailable: {error}"
            ) from error

    async def place(self, exclude: set[str] = frozenset()) -> WorkerInfo:
        """The live worker with the most free slots.

        A worker too busy to answer its load probe in time is still alive:
        it is chosen when no other has room (it refuses the session itself
        if it is full). Workers that cannot be reached make the answer
        UNAVAILABLE, not RESOURCE_EXHAUSTED: only workers that said they are
        full make the cluster full.
        """
        workers = await self._directory(self.directory.live_workers())
        workers = [w for w in workers if w.worker_id not in exclude]
        if not workers:
            raise _Refusal(grpc.StatusCode.UNAVAILABLE, "no live workers")
        loads = await asyncio.gather(
            *(self._load(w) for w in workers), return_exceptions=True
        )
        best: tuple[int, WorkerInfo] | None = None
        slow: list[WorkerInfo] = []
        unreachable = 0
        for worker, load in zip(workers, loads, strict=True):
            if isinstance(load, BaseException):
                log.warning(
                    "worker %s did not report its load: %s", worker.worker_id, load
                )
                code = load.code() if isinstance(load, grpc.aio.AioRpcError) else None
                # Slow only if connected: a host that drops packets times out
                # too, while its connection is still being attempted.
                connected = self.channel(worker.address).get_state() is (
                    grpc.ChannelConnectivity.READY
                )
                if code is grpc.StatusCode.DEADLINE_EXCEEDED and connected:
                    slow.append(worker)
                else:
                    unreachable += 1
                continue
            if load.free_slots > 0 and (best is None or load.free_slots > best[0]):
                best = (load.free_slots, worker)
        if best is not None:
            return best[1]
        if slow:
            return slow[0]
        if unreachable:
            raise _Refusal(
                grpc.StatusCode.UNAVAILABLE,
                f"{unreachable} of {len(workers)} live workers could not be "
                "reached and the others are full or draining",
            )
        raise _Refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "every live worker is full or draining",
        )

    async def _load(self, worker: WorkerInfo) -> pb.WorkerLoad:
        stub = pb_grpc.WorkerControlStub(self.channel(worker.address))
        return await stub.GetLoad(pb.GetLoadRequest(), timeout=self.load_timeout_s)

    async def _route(self, first: pb.ClientMessage, relay: _Relay) -> WorkerInfo:
        kind = first.WhichOneof("kind")
        if kind == "open":
            return await self.place()
        if kind == "resume":
            session_id = first.resume.session_id
            worker_id = await self._directory(self.directory.get_session(session_id))
            if worker_id is None:
                raise _Refusal(
                    grpc.StatusCode.NOT_FOUND, f"no session {session_id[:80]!r}"
                )
            worker = await self._directory(self.directory.worker(worker_id))
            if worker is None:
                # Its worker is gone: any worker can restore it from its snapshot.
                log.info("session %s lost worker %s; re-placing", session_id, worker_id)
                relay.rerouted = True
                return await self.place()
            return worker
        raise _Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the first message of a stream must be open or resume",
        )

    async def Converse(
        self,
        request_iterator: AsyncIterator[pb.ClientMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ServerMessage]:
        try:
            first = await anext(aiter(request_iterator), None)
        except Exception as error:  # e.g. a message that is not valid protobuf
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"bad message: {error}"
            )
        if first is None:
            return
        self.metrics.streams.inc()
        relay = _Relay()
        inbox: asyncio.Queue[object] = asyncio.Queue()
        reader = asyncio.create_task(_read_client(request_iterator, inbox, relay))
        try:
            worker = await self._route(first, relay)
            async for message in self._relay(first, worker, inbox, relay):
                yield message
            if relay.bad_input:
                raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, relay.bad_input)
        except _Refusal as refusal:
            self.metrics.failures.labels(code=refusal.code.name).inc()
            await context.abort(refusal.code, refusal.message)
        except grpc.aio.AioRpcError as error:
            self.metrics.failures.labels(code=error.code().name).inc()
            await context.abort(error.code(), error.details() or "worker stream failed")
        finally:
            self.metrics.streams.dec()
            reader.cancel()

    async def _relay(
        self,
        first: pb.ClientMessage,
        worker: WorkerInfo,
        inbox: asyncio.Queue[object],
        relay: _Relay,
    ) -> AsyncIterator[pb.ServerMessage]:
        """Relay one session, moving it when its worker dies or drains."""
        attach = first
        if first.WhichOneof("kind") == "resume":
            relay.session_id = first.resume.session_id
        lost_workers: set[str] = set()
        while True:
            call = pb_grpc.SessionsStub(self.channel(worker.address)).Converse()
            pump = None
            try:
                await call.write(attach)
                opened = await call.read()
                if opened is grpc.aio.EOF:
                    raise _Refusal(
                        grpc.StatusCode.UNAVAILABLE, "the worker closed the stream"
                    )
                yield await self._attached(attach, opened.opened, worker, relay)
                pump = asyncio.create_task(_pump(inbox, call, relay))
                while (message := await call.read()) is not grpc.aio.EOF:
                    self._observe(message, relay)
                    if message.WhichOneof("kind") == "closed":
                        await self._directory(
                            self.directory.delete_session(message.closed.session_id)
                        )
                    yield message
                return  # the worker ended the stream: closed, or client done
            except grpc.aio.AioRpcError as error:
                if relay.session_id is None or error.code() not in _WORKER_LOST:
                    raise
                log.warning(
                    "worker %s lost (%s); moving session %s",
                    worker.worker_id,
                    error.code().name,
                    relay.session_id,
                )
                if (
                    relay.turn_open
                    and not relay.reply_started
                    and relay.turn_message is not None
                ):
                    # Nothing of the reply reached the client, and the snapshot
                    # the next worker restores predates the turn: it answers
                    # the turn afresh, and the client need not know. (A turn
                    # whose write was cut short is still at the head.)
                    if not relay.outbox or relay.outbox[0] is not relay.turn_message:
                        relay.outbox.insert(0, relay.turn_message)
                    relay.turn_open = False
            finally:
                if pump is not None:
                    pump.cancel()
                call.cancel()
            lost_workers.add(worker.worker_id)
            worker = await self.place(exclude=lost_workers)
            attach = pb.ClientMessage(
                resume=pb.ResumeSession(session_id=relay.session_id)
            )
            relay.moving = True

    async def _attached(
        self,
        attach: pb.ClientMessage,
        opened: pb.SessionOpened,
        worker: WorkerInfo,
        relay: _Relay,
    ) -> pb.ServerMessage:
        """Record the affinity; the first attach answers `opened`, a move
        answers `moved`."""
        relay.session_id = opened.session_id
        first_attach = not relay.attached
        relay.attached = True
        if attach.WhichOneof("kind") == "open":
            self.metrics.sessions_opened.inc()
        if attach.WhichOneof("kind") == "open" or relay.moving or relay.rerouted:
            await self._directory(
                self.directory.put_session(opened.session_id, worker.worker_id)
            )
        relay.rerouted = False
        if first_attach:
            relay.moving = False
            return pb.ServerMessage(opened=opened)
        relay.moving = False
        self.metrics.sessions_moved.inc()
        # A turn whose reply began may still have finished and been
        # snapshotted before the worker went: then the restored session holds
        # it (the client missed only the end of its reply), and it is not lost.
        kept = relay.reply_turn is not None and opened.num_turns >= relay.reply_turn
        turn_lost = relay.turn_open and not kept
        if not turn_lost:
            # After the user turn that is sent again (if any), before what
            # the client wrote since.
            at = 1 if relay.outbox and relay.outbox[0] is relay.turn_message else 0
            relay.outbox[at:at] = relay.replay
        relay.replay = []
        moved = pb.SessionMoved(
            worker_id=opened.worker_id,
            turn_lost=turn_lost,
            cache_length=opened.cache_length,
            num_turns=opened.num_turns,
        )
        relay.turn_open = False
        return pb.ServerMessage(moved=moved)

    def _observe(self, message: pb.ServerMessage, timing: _Relay) -> None:
        kind = message.WhichOneof("kind")
        if kind in ("token", "eviction", "interrupted", "turn_end"):
            timing.reply_started = True
        if kind == "turn_end":
            timing.turn_open = False
        elif kind == "token":
            timing.reply_turn = message.token.turn
            now = time.perf_counter()
            self.metrics.tokens_relayed.inc()
            if timing.last_token_s is not None:
                self.metrics.itl.observe(now - timing.last_token_s)
            elif timing.turn_sent_s is not None:
                self.metrics.ttft.observe(now - timing.turn_sent_s)
            timing.last_token_s = now
        elif kind == "eviction":
            self.metrics.evictions_relayed.inc()


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


async def start_gateway_server(
    directory: SessionDirectory, bind: str, metrics: GatewayMetrics | None = None
) -> tuple[grpc.aio.Server, int, GatewayServicer]:
    server = grpc.aio.server()
    port = server.add_insecure_port(bind)
    servicer = GatewayServicer(directory, metrics)
    pb_grpc.add_SessionsServicer_to_server(servicer, server)
    health = rpc.add_health_and_reflection(server, [rpc.SESSIONS_SERVICE])
    await server.start()
    await rpc.set_serving(health, [rpc.SESSIONS_SERVICE], True)
    log.info("gateway listening on port %d", port)
    return server, port, servicer
