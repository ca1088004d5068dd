"""The worker's gRPC face: translate messages, delegate to the engine."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator

import grpc

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from protos.sinkserve.v1 import sinkserve_pb2_grpc as pb_grpc
from services import rpc
from worker.engine import Engine
from worker.errors import InvalidRequest, SinkserveError
from worker.persistence import SessionPersistence
from worker.session import (
    EndReason,
    EvictionEvent,
    EvictionPolicy,
    InterruptedEvent,
    SamplingParams,
    Session,
    TokenEvent,
    TurnEndEvent,
)

log = logging.getLogger(__name__)

_END_REASONS = {
    EndReason.STOP: pb.END_REASON_STOP,
    EndReason.LENGTH: pb.END_REASON_LENGTH,
    EndReason.CANCELLED: pb.END_REASON_CANCELLED,
    EndReason.ERROR: pb.END_REASON_ERROR,
    EndReason.INTERRUPTED: pb.END_REASON_INTERRUPTED,
}
_EVICTIONS = {
    pb.EVICTION_TOKENS: EvictionPolicy.TOKENS,
    pb.EVICTION_TURNS: EvictionPolicy.TURNS,
}
_CLIENT_DONE = object()  # the client half-closed its side of the stream
_CLOSED = object()  # the session was closed; end the stream
_TAKEN_OVER = object()  # another stream resumed the session


def sampling_from_pb(
    message: pb.SamplingParams, default_max_new_tokens: int
) -> SamplingParams:
    return SamplingParams(
        temperature=message.temperature,
        top_p=message.top_p or 1.0,
        top_k=message.top_k,
        max_new_tokens=message.max_new_tokens or default_max_new_tokens,
        seed=message.seed if message.HasField("seed") else None,
    )


def event_to_pb(event: object) -> pb.ServerMessage:
    if isinstance(event, TokenEvent):
        delta = pb.TokenDelta(
            turn=event.turn, index=event.index, token_id=event.token_id, text=event.text
        )
        return pb.ServerMessage(token=delta)
    if isinstance(event, EvictionEvent):
        e = event.eviction
        notice = pb.EvictionNotice(
            turn=event.turn,
            num_evicted=e.num_evicted,
            turns_gone=list(e.turns_gone),
            turn_partial=e.turn_partial or 0,
            cache_length=e.length_after,
        )
        return pb.ServerMessage(eviction=notice)
    if isinstance(event, TurnEndEvent):
        s = event.stats
        stats = pb.TurnStats(
            num_prefilled=s.num_prefilled,
            num_reused=s.num_reused,
            num_evicted=s.num_evicted,
            num_generated=s.num_generated,
            ttft_ms=s.ttft_ms,
            decode_tokens_per_s=s.decode_tokens_per_s,
            cache_length=s.cache_length,
        )
        end = pb.TurnEnd(
            turn=event.turn,
            reason=_END_REASONS[event.reason],
            stats=stats,
            text=event.text,
        )
        return pb.ServerMessage(turn_end=end)
    if isinstance(event, InterruptedEvent):
        cut = event.cut
        warning = ""
        if cut.clamped:
            warning = f"heard point past the reply's {cut.num_kept} tokens; clamped"
        if cut.num_lost:
            warning += (
                f"{'; ' if warning else ''}{cut.num_lost} heard tokens were evicted"
            )
        interrupted = pb.Interrupted(
            turn=cut.turn,
            num_kept=cut.num_kept,
            num_rolled_back=cut.num_rolled_back,
            num_lost=cut.num_lost,
            clamped=cut.clamped,
            text=cut.text,
            warning=warning,
        )
        return pb.ServerMessage(interrupted=interrupted)
    raise TypeError(f"no message for {type(event).__name__}")


class WorkerServicer(pb_grpc.SessionsServicer, pb_grpc.WorkerControlServicer):
    """Serves sessions straight from this worker's engine."""

    def __init__(
        self,
        engine: Engine,
        worker_id: str,
        model_name: str,
        persistence: SessionPersistence | None = None,
    ):
        self.engine = engine
        self.persistence = persistence
        self.worker_id = worker_id
        self.model_name = model_name

    async def GetLoad(
        self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerLoad:
        return pb.WorkerLoad(
            worker_id=self.worker_id,
            num_sessions=len(self.engine.sessions),
            free_slots=self.engine.free_slots,
            model=self.model_name,
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
        try:
            session, resumed = await self._attach(first)
        except SinkserveError as error:
            self._count_error(rpc.status_of(error))
            await context.abort(rpc.status_of(error), str(error))
            return

        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[object] = asyncio.Queue()

        def sink(event: object) -> None:
            loop.call_soon_threadsafe(outbox.put_nowait, event)

        previous = session.sink
        session.sink = sink
        if previous is not None:  # the newest stream wins; the old one ends
            previous(_TAKEN_OVER)
        interrupts: list[float] = []  # arrival times of interruptions in flight
        reader = asyncio.create_task(
            self._read(session, request_iterator, outbox, interrupts)
        )
        try:
            yield self._opened(session, resumed)
            client_done = False
            while True:
                item = await outbox.get()
                if item is _CLOSED:
                    return
                if item is _TAKEN_OVER:
                    await context.abort(
                        grpc.StatusCode.ABORTED,
                        "the session was resumed on another stream",
                    )
                if item is _CLIENT_DONE:
                    client_done = True
                    turn = session.turn
                    if (
                        session.sink is sink
                        and session.busy
                        and turn is not None
                        and turn.draft
                        and not turn.final_received
                    ):
                        # Its final text can no longer come: drop the turn,
                        # and let its TurnEnd reach the outbox before leaving.
                        self.engine.cancel_turn(session.session_id)
                        await asyncio.sleep(0)
                elif isinstance(item, pb.ServerMessage):
                    yield item
                else:
                    yield event_to_pb(item)
                    if isinstance(item, InterruptedEvent) and interrupts:
                        latency_s = time.perf_counter() - interrupts.pop(0)
                        self.engine.metrics.interruption_latency.observe(latency_s)
                if client_done and not session.busy and outbox.empty():
                    return
        finally:
            reader.cancel()
            if session.sink is sink:
                session.sink = None
                self.engine.cancel_turn(session.session_id)

    async def _attach(self, first: pb.ClientMessage) -> tuple[Session, bool]:
        kind = first.WhichOneof("kind")
        if kind == "open":
            open_ = first.open
            cache = open_.cache
            if cache.eviction and cache.eviction not in _EVICTIONS:
                raise InvalidRequest(f"unknown eviction policy {cache.eviction}")
            return (
                self.engine.open_session(
                    open_.system_prompt if open_.HasField("system_prompt") else None,
                    sampling_from_pb(open_.sampling, self.engine.config.max_new_tokens),
                    cache.sink_size if cache.HasField("sink_size") else None,
                    cache.window_size or None,
                    eviction=_EVICTIONS.get(cache.eviction),
                ),
                False,
            )
        if kind == "resume":
            session_id = first.resume.session_id
            if session_id in self.engine.sessions or self.persistence is None:
                return self.engine.get(session_id), True
            return await self.persistence.restore(session_id), True
        raise InvalidRequest("the first message of a stream must be open or resume")

    def _opened(self, session: Session, resumed: bool) -> pb.ServerMessage:
        return pb.ServerMessage(
            opened=pb.SessionOpened(
                session_id=session.session_id,
                worker_id=self.worker_id,
                sink_size=session.config.sink_size,
                window_size=session.config.window_size,
                num_system_tokens=session.num_system_tokens,
                cache_length=session.cache.length,
                num_turns=session.num_turns,
                resumed=resumed,
            )
        )

    async def _read(
        self,
        session: Session,
        request_iterator: AsyncIterator[pb.ClientMessage],
        outbox: asyncio.Queue[object],
        interrupts: list[float],
    ) -> None:
        try:
            async for message in request_iterator:
                reply = self._handle(session, message, interrupts)
                closed = reply is not None and reply.WhichOneof("kind") == "closed"
                if closed and self.persistence is not None:
                    # SessionClosed promises that nothing of the session is
                    # left, its snapshot included.
                    await self.persistence.forget(session.session_id)
                if reply is not None:
                    outbox.put_nowait(reply)
                if message.WhichOneof("kind") == "close":
                    outbox.put_nowait(_CLOSED)
                    return
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError:
            pass
        except Exception as error:  # undecodable input: say so, stop reading
            code = grpc.StatusCode.INVALID_ARGUMENT
            self._count_error(code)
            outbox.put_nowait(rpc.error_message(code, f"bad message: {error}"))
        outbox.put_nowait(_CLIENT_DONE)

    def _handle(
        self, session: Session, message: pb.ClientMessage, interrupts: list[float]
    ) -> pb.ServerMessage | None:
        kind = message.WhichOneof("kind")
        received_s = time.perf_counter()
        try:
            if kind == "user_turn":
                turn = message.user_turn
                self.engine.submit_turn(
                    session.session_id, turn.text, turn.max_new_tokens or None
                )
                return None
            if kind == "close":
                self.engine.close_session(session.session_id)
                # `_read` deletes the snapshot before this answer goes out.
                closed = pb.SessionClosed(session_id=session.session_id)
                return pb.ServerMessage(closed=closed)
            if kind == "interrupt":
                interrupt = message.interrupt
                which = interrupt.WhichOneof("heard")
                self.engine.interrupt(
                    session.session_id,
                    heard_tokens=interrupt.heard_tokens
                    if which == "heard_tokens"
                    else None,
                    heard_chars=interrupt.heard_chars
                    if which == "heard_chars"
                    else None,
                )
                interrupts.append(received_s)
                return None
            if kind == "ack":
                self.engine.acknowledge(session.session_id, message.ack.played_tokens)
                return None
            if kind == "partial_user_turn":
                partial = message.partial_user_turn
                self.engine.partial_turn(
                    session.session_id, partial.text, partial.final
                )
                return None
            raise InvalidRequest(
                f"{kind or 'an empty message'} is not valid mid-stream"
            )
        except SinkserveError as error:
            code = rpc.status_of(error)
            self._count_error(code)
            return rpc.error_message(code, str(error))

    def _count_error(self, code: grpc.StatusCode) -> None:
        self.engine.metrics.errors.labels(code=code.name).inc()


async def start_worker_server(
    engine: Engine,
    bind: str,
    worker_id: str | None = None,
    model_name: str = "",
    persistence: SessionPersistence | None = None,
) -> tuple[grpc.aio.Server, int, WorkerServicer]:
    """Start a worker's gRPC server on `bind` ("host:port", port 0 picks one).

    The worker id defaults to the address it listens on, with this
    machine's host name for a wildcard host (0.0.0.0 or ::), so that two
    machines never share an id.
    """
    server = grpc.aio.server()
    port = server.add_insecure_port(bind)
    host = bind.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = socket.gethostname()
    servicer = WorkerServicer(
        engine, worker_id or f"{host}:{port}", model_name, persistence
    )
    pb_grpc.add_SessionsServicer_to_server(servicer, server)
    pb_grpc.add_WorkerControlServicer_to_server(servicer, server)
    services = [rpc.SESSIONS_SERVICE, rpc.WORKER_CONTROL_SERVICE]
    servicer.health = rpc.add_health_and_reflection(server, services)
    await server.start()
    await rpc.set_serving(servicer.health, services, True)
    log.info("worker %s listening on port %d", servicer.worker_id, port)
    return server, port, servicer
