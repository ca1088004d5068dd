"""Where the gateway places a new session, and how it says it cannot.

Full workers make RESOURCE_EXHAUSTED; workers that cannot be reached make
UNAVAILABLE (worth retrying); a worker too busy to answer its load probe in
time still gets the session.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from benchmarks.common import free_port
from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation, RequestRefused
from services.directory import MemoryDirectory, WorkerInfo
from services.embedded import gateway_node, worker_node
from worker.engine import Engine, EngineConfig
from worker.server import WorkerServicer
from worker.session import SamplingParams


async def _open(address: str) -> pb.SessionOpened:
    async with grpc.aio.insecure_channel(address) as channel:
        conversation = Conversation(channel)
        opened = await conversation.open(sampling=pb.SamplingParams(max_new_tokens=2))
        await conversation.close()
        return opened


async def _refusal(address: str) -> RequestRefused:
    with pytest.raises(RequestRefused) as caught:
        await _open(address)
    return caught.value


async def test_full_workers_exhaust_and_unreachable_ones_are_unavailable(tiny):
    directory = MemoryDirectory()
    engine = Engine(tiny[0], EngineConfig(max_sessions=1))
    engine.open_session(None, SamplingParams())  # its only slot
    async with (
        worker_node(engine, directory, worker_id="full"),
        gateway_node(directory) as (address, _),
    ):
        refused = await _refusal(address)
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in refused.message

        dead = WorkerInfo("dead", f"127.0.0.1:{free_port()}")
        await directory.register_worker(dead, ttl_s=None)
        refused = await _refusal(address)
        assert refused.code == grpc.StatusCode.UNAVAILABLE
        assert "could not be reached" in refused.message


async def test_a_worker_slow_to_report_its_load_still_gets_sessions(tiny, monkeypatch):
    async def slow_load(self, request, context):
        await asyncio.sleep(1.0)
        return pb.WorkerLoad(worker_id=self.worker_id)

    monkeypatch.setattr(WorkerServicer, "GetLoad", slow_load)
    directory = MemoryDirectory()
    async with (
        worker_node(Engine(tiny[0]), directory, worker_id="busy"),
        gateway_node(directory) as (address, gateway),
    ):
        gateway.load_timeout_s = 0.2
        opened = await _open(address)
        assert opened.worker_id == "busy"
