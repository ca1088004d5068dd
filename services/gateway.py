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
from collections.abc import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from protos.sinkserve.v1 import sinkserve_pb2_grpc as pb_grpc
from services import rpc
from services.directory import SessionDirectory, WorkerInfo

log = logging.getLogger(__name__)

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


class _Timing:
    """Turn timing for the gateway's latency histograms."""

    def __init__(self) -> None:
        self.turn_sent_s: float | None = None
        self.last_token_s: float | None = None


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

    async def place(self) -> WorkerInfo:
        """The live worker with the most free slots."""
        workers = await self.directory.live_workers()
        if not workers:
            raise _Refusal(grpc.StatusCode.UNAVAILABLE, "no live workers")
        loads = await asyncio.gather(
            *(self._load(w) for w in workers), return_exceptions=True
        )
        best: tuple[int, WorkerInfo] | None = None
        for worker, load in zip(workers, loads, strict=True):
            if isinstance(load, BaseException):
                log.warning(
                    "worker %s did not report its load: %s", worker.worker_id, load
                )
                continue
            if load.free_slots > 0 and (best is None or load.free_slots > best[0]):
                best = (load.free_slots, worker)
        if best is None:
            raise _Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "every live worker is full or draining",
            )
        return best[1]

    async def _load(self, worker: WorkerInfo) -> pb.WorkerLoad:
        stub = pb_grpc.WorkerControlStub(self.channel(worker.address))
        return await stub.GetLoad(pb.GetLoadRequest(), timeout=self.load_timeout_s)

    async def _route(self, first: pb.ClientMessage) -> WorkerInfo:
        kind = first.WhichOneof("kind")
        if kind == "open":
            return await self.place()
        if kind == "resume":
            session_id = first.resume.session_id
            worker_id = await self.directory.get_session(session_id)
            if worker_id is None:
                raise _Refusal(grpc.StatusCode.NOT_FOUND, f"no session {session_id!r}")
            worker = await self.directory.worker(worker_id)
            if worker is None:
                raise _Refusal(
                    grpc.StatusCode.UNAVAILABLE,
                    f"session {session_id!r} is on worker {worker_id}, "
                    "which is not live",
                )
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
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        self.metrics.streams.inc()
        call = None
        pump = None
        try:
            worker = await self._route(first)
            call = pb_grpc.SessionsStub(self.channel(worker.address)).Converse()
            await call.write(first)
            opened = await call.read()
            if opened is grpc.aio.EOF:
                raise _Refusal(
                    grpc.StatusCode.UNAVAILABLE, "the worker closed the stream"
                )
            if first.WhichOneof("kind") == "open":
                await self.directory.put_session(
                    opened.opened.session_id, worker.worker_id
                )
                self.metrics.sessions_opened.inc()
            yield opened

            timing = _Timing()
            pump = asyncio.create_task(self._pump(request_iterator, call, timing))
            while (message := await call.read()) is not grpc.aio.EOF:
                self._observe(message, timing)
                if message.WhichOneof("kind") == "closed":
                    await self.directory.delete_session(message.closed.session_id)
                yield message
        except _Refusal as refusal:
            self.metrics.failures.labels(code=refusal.code.name).inc()
            await context.abort(refusal.code, refusal.message)
        except grpc.aio.AioRpcError as error:
            self.metrics.failures.labels(code=error.code().name).inc()
            await context.abort(error.code(), error.details() or "worker stream failed")
        finally:
            self.metrics.streams.dec()
            if pump is not None:
                pump.cancel()
            if call is not None:
                call.cancel()

    async def _pump(
        self,
        request_iterator: AsyncIterator[pb.ClientMessage],
        call: grpc.aio.StreamStreamCall,
        timing: _Timing,
    ) -> None:
        """Client to worker, until the client half-closes."""
        try:
            async for message in request_iterator:
                if message.WhichOneof("kind") == "user_turn":
                    timing.turn_sent_s = time.perf_counter()
                    timing.last_token_s = None
                await call.write(message)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the worker side ended; the relay loop reports it

    def _observe(self, message: pb.ServerMessage, timing: _Timing) -> None:
        kind = message.WhichOneof("kind")
        if kind == "token":
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
