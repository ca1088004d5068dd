"""Both session directories pass the same suite; Redis is a real server."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import redis

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation, RequestRefused
from services.directory import MemoryDirectory, RedisDirectory, WorkerInfo
from services.embedded import embedded_stack
from worker.engine import Engine


@pytest.fixture()
def redis_url(redis_proc) -> str:
    return f"redis://{redis_proc.host}:{redis_proc.port}/0"


@pytest.fixture(params=["memory", "redis"])
async def directory(request):
    if request.param == "memory":
        yield MemoryDirectory()
        return
    url = request.getfixturevalue("redis_url")
    directory = RedisDirectory(url, namespace=f"test-{uuid.uuid4().hex[:8]}")
    yield directory
    await directory.close()


async def test_session_affinity_round_trip(directory):
    assert await directory.get_session("s1") is None
    await directory.put_session("s1", "w1")
    assert await directory.get_session("s1") == "w1"
    await directory.put_session("s1", "w2")
    assert await directory.get_session("s1") == "w2"
    await directory.delete_session("s1")
    assert await directory.get_session("s1") is None


async def test_workers_register_and_expire(directory):
    await directory.register_worker(WorkerInfo("w1", "127.0.0.1:1"), ttl_s=0.3)
    await directory.register_worker(WorkerInfo("w2", "127.0.0.1:2"), ttl_s=None)
    assert {w.worker_id for w in await directory.live_workers()} == {"w1", "w2"}
    assert await directory.worker("w2") == WorkerInfo("w2", "127.0.0.1:2")
    await asyncio.sleep(0.5)
    assert [w.worker_id for w in await directory.live_workers()] == ["w2"]
    await directory.unregister_worker("w2")
    assert await directory.live_workers() == []


async def test_redis_keys_are_namespaced_and_expire(redis_url):
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    directory = RedisDirectory(redis_url, namespace=namespace, session_ttl_s=60)
    await directory.put_session("s1", "w1")
    await directory.register_worker(WorkerInfo("w1", "127.0.0.1:1"), ttl_s=5)
    await directory.register_worker(WorkerInfo("w2", "127.0.0.1:2"), ttl_s=None)
    client = redis.Redis.from_url(redis_url)
    keys = client.keys(f"{namespace}:*")
    assert len(keys) == 3
    assert all(0 < client.ttl(key) <= 24 * 3600 for key in keys)
    await directory.close()


async def test_gateway_with_redis_writes_affinity_only_after_accept(tiny, redis_url):
    loaded, _ = tiny
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    directory = RedisDirectory(redis_url, namespace=namespace)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    async with embedded_stack(Engine(loaded), directory=directory) as stack:
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            with pytest.raises(RequestRefused):
                await Conversation(channel).open(window_size=10**6)
            assert client.keys(f"{namespace}:session:*") == []

            conversation = Conversation(channel)
            opened = await conversation.open(
                sampling=pb.SamplingParams(max_new_tokens=3)
            )
            key = f"{namespace}:session:{opened.session_id}"
            assert client.get(key) == opened.worker_id
            await conversation.detach()
            resumed = await Conversation(channel).resume(opened.session_id)
            assert resumed.session_id == opened.session_id
    await directory.close()


async def test_closing_a_session_removes_its_affinity(tiny, directory):
    loaded, _ = tiny
    async with embedded_stack(Engine(loaded), directory=directory) as stack:
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            conversation = Conversation(channel)
            opened = await conversation.open()
            assert await directory.get_session(opened.session_id) == opened.worker_id
            await conversation.close()
            assert await directory.get_session(opened.session_id) is None
            with pytest.raises(RequestRefused) as caught:
                await Conversation(channel).resume(opened.session_id)
            assert caught.value.code == grpc.StatusCode.NOT_FOUND
