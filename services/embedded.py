"""Running the pieces in-process: a worker node, a gateway node, or both.

The embedded default is a gateway and a worker in one process. They still
talk over real gRPC on 127.0.0.1, with the in-memory directory, so the
embedded path is the distributed path minus Redis. The CLI's `worker` and
`gateway` commands run the same nodes on their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from services import rpc
from services.directory import MemoryDirectory, SessionDirectory, WorkerInfo
from services.gateway import GatewayMetrics, GatewayServicer, start_gateway_server
from services.snapshot_store import RedisSnapshotStore

if TYPE_CHECKING:  # the worker side imports torch; a gateway never needs it
    from worker.engine import Engine
    from worker.persistence import PersistenceConfig, SessionPersistence
    from worker.server import WorkerServicer

log = logging.getLogger(__name__)


@dataclass
class WorkerNode:
    address: str
    engine: Engine
    servicer: WorkerServicer
    server: grpc.aio.Server
    persistence: SessionPersistence | None

    async def drain(self, directory: SessionDirectory | None, grace_s: float) -> None:
        """Stop taking sessions, let turns finish, flush snapshots, leave.

        Gateways see the streams end and move the sessions to other workers,
        which restore them from the snapshots.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        self.engine.stop_accepting()
        services = [rpc.SESSIONS_SERVICE, rpc.WORKER_CONTROL_SERVICE]
        await rpc.set_serving(self.servicer.health, services, False)
        while self.engine.has_busy_sessions() and loop.time() < deadline - grace_s / 4:
            await asyncio.sleep(0.05)
        if self.persistence is not None:
            # The settle hook stays on: a turn answered during the grace is
            # snapshotted too, and flushed once the server has stopped.
            for session_id in list(self.engine.sessions):
                try:
                    await self.persistence.snapshot_now(session_id)
                except Exception as error:  # a turn still running: it is lost
                    log.warning(
                        "session %s not snapshotted on drain: %s", session_id, error
                    )
        if directory is not None:
            await directory.unregister_worker(self.servicer.worker_id)
        await self.server.stop(grace=max(deadline - loop.time(), 0.1))
        if self.persistence is not None:
            await self.persistence.stop()
        self.engine.stop()
        log.info("worker %s drained", self.servicer.worker_id)

    async def kill(self) -> None:
        """Stop at once, as a crash would: no drain, nothing flushed.

        The engine stops first and settles nothing more, so no snapshot is
        taken of what happens to the sessions as their streams are cut.
        """
        self.engine.on_settled = None
        self.engine.stop()
        await self.server.stop(grace=None)


@asynccontextmanager
async def worker_node(
    engine: Engine,
    directory: SessionDirectory | None,
    bind: str = "127.0.0.1:0",
    worker_id: str | None = None,
    advertise: str | None = None,
    store: RedisSnapshotStore | None = None,
    persistence_config: PersistenceConfig | None = None,
    heartbeat_s: float | None = None,
    drain_grace_s: float = 10.0,
    reap_after_s: float | None = 3600.0,
) -> AsyncIterator[WorkerNode]:
    """Run a worker until the block exits, then drain it.

    With a `store`, sessions are snapshotted after every turn and restored
    on resume. With `heartbeat_s`, the worker's directory entry expires three
    beats after it stops refreshing it. Without a store, sessions left with
    no stream for `reap_after_s` are closed, so abandoned ones free their slots.
    """
    from worker.persistence import SessionPersistence
    from worker.server import start_worker_server

    persistence = None
    if store is not None:
        persistence = SessionPersistence(engine, store, persistence_config)
    engine.start()
    if persistence is not None:
        persistence.start()
    # Without an id of its own, a worker is known by the address it publishes.
    server, port, servicer = await start_worker_server(
        engine, bind, worker_id or advertise, engine.loaded.name, persistence
    )
    address = advertise or f"127.0.0.1:{port}"
    node = WorkerNode(address, engine, servicer, server, persistence)
    heartbeat = None
    if directory is not None:
        info = WorkerInfo(servicer.worker_id, address)
        if heartbeat_s:
            heartbeat = asyncio.create_task(_heartbeat(directory, info, heartbeat_s))
        else:
            await directory.register_worker(info, None)
    reaper = None
    if persistence is None and reap_after_s:
        reaper = asyncio.create_task(_reap(engine, reap_after_s))
    try:
        yield node
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
        if reaper is not None:
            reaper.cancel()
        if engine.running:
            await node.drain(directory, drain_grace_s)


async def _heartbeat(
    directory: SessionDirectory, info: WorkerInfo, period_s: float
) -> None:
    """Keep the worker's registry entry alive; it expires 3 periods after death."""
    while True:
        try:
            await directory.register_worker(info, ttl_s=3 * period_s)
        except Exception as error:  # Redis down: keep serving, retry next beat
            log.warning("worker heartbeat failed: %s", error)
        await asyncio.sleep(period_s)


async def _reap(engine: Engine, after_s: float) -> None:
    """Close sessions abandoned (idle, no stream) for `after_s` seconds."""
    while True:
        await asyncio.sleep(min(after_s / 4, 60.0))
        for session_id in engine.idle_sessions(after_s):
            try:
                engine.close_session(session_id)
                log.info(
                    "session %s closed after %.0f s abandoned", session_id, after_s
                )
            except Exception:  # closed meanwhile
                pass


@asynccontextmanager
async def gateway_node(
    directory: SessionDirectory,
    bind: str = "127.0.0.1:0",
    metrics: GatewayMetrics | None = None,
) -> AsyncIterator[tuple[str, GatewayServicer]]:
    server, port, servicer = await start_gateway_server(directory, bind, metrics)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(grace=1)
        await servicer.close()


@dataclass
class Stack:
    gateway_address: str
    worker_address: str
    engine: Engine
    gateway: GatewayServicer
    worker: WorkerServicer
    directory: SessionDirectory
    node: WorkerNode


@asynccontextmanager
async def embedded_stack(
    engine: Engine,
    gateway_bind: str = "127.0.0.1:0",
    worker_bind: str = "127.0.0.1:0",
    directory: SessionDirectory | None = None,
    gateway_metrics: GatewayMetrics | None = None,
    store: RedisSnapshotStore | None = None,
) -> AsyncIterator[Stack]:
    """Run engine, worker server and gateway until the block exits."""
    directory = directory or MemoryDirectory()
    async with worker_node(
        engine, directory, worker_bind, store=store, drain_grace_s=1
    ) as node:
        async with gateway_node(directory, gateway_bind, gateway_metrics) as (
            address,
            gateway,
        ):
            yield Stack(
                address,
                node.address,
                engine,
                gateway,
                node.servicer,
                directory,
                node,
            )
