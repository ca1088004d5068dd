"""A gateway and a worker in one process: the embedded default.

They still talk over real gRPC on 127.0.0.1, with the in-memory directory,
so the embedded path is the distributed path minus Redis.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from services.directory import MemoryDirectory, SessionDirectory, WorkerInfo
from services.gateway import GatewayMetrics, GatewayServicer, start_gateway_server
from worker.engine import Engine
from worker.server import WorkerServicer, start_worker_server

log = logging.getLogger(__name__)


@dataclass
class Stack:
    gateway_address: str
    worker_address: str
    engine: Engine
    gateway: GatewayServicer
    worker: WorkerServicer
    directory: SessionDirectory


@asynccontextmanager
async def embedded_stack(
    engine: Engine,
    gateway_bind: str = "127.0.0.1:0",
    worker_bind: str = "127.0.0.1:0",
    directory: SessionDirectory | None = None,
    gateway_metrics: GatewayMetrics | None = None,
) -> AsyncIterator[Stack]:
    """Run engine, worker server and gateway until the block exits."""
    directory = directory or MemoryDirectory()
    engine.start()
    worker_server, worker_port, worker = await start_worker_server(
        engine, worker_bind, model_name=engine.loaded.name
    )
    worker_address = f"127.0.0.1:{worker_port}"
    await directory.register_worker(WorkerInfo(worker.worker_id, worker_address), None)
    gateway_server, gateway_port, gateway = await start_gateway_server(
        directory, gateway_bind, gateway_metrics
    )
    try:
        yield Stack(
            f"127.0.0.1:{gateway_port}",
            worker_address,
            engine,
            gateway,
            worker,
            directory,
        )
    finally:
        await gateway_server.stop(grace=1)
        await gateway.close()
        await worker_server.stop(grace=1)
        await directory.unregister_worker(worker.worker_id)
        engine.stop()
