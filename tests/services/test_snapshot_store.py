"""The Redis snapshot store against a real Redis server."""

from __future__ import annotations

import os
import uuid

import pytest
import redis
from pytest_redis import factories

from services.snapshot_store import (
    RedisSnapshotStore,
    SnapshotCorrupt,
    SnapshotMissing,
    StoreUnavailable,
)
from tests.conftest import restart_redis
from tests.worker.test_engine import run_turn
from worker.engine import Engine
from worker.session import SamplingParams
from worker.snapshot import decode_snapshot, encode_snapshot

# A server of its own, so that stopping it disturbs no other test.
outage_redis = factories.redis_proc(port=None)

CHUNK = 1000
TTL_S = 600


def url_of(proc) -> str:
    return f"redis://{proc.host}:{proc.port}/0"


@pytest.fixture()
def redis_url(redis_proc) -> str:
    return url_of(redis_proc)


@pytest.fixture()
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
async def store(redis_url, namespace):
    store = RedisSnapshotStore(
        redis_url, namespace=namespace, ttl_s=TTL_S, chunk_bytes=CHUNK
    )
    yield store
    await store.close()


@pytest.fixture()
def client(redis_url) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def keys_of(client: redis.Redis, namespace: str) -> list[str]:
    return sorted(k.decode() for k in client.keys(f"{namespace}:*"))


def generations(keys: list[str]) -> set[str]:
    """Generation ids of the chunk keys (<ns>:snap:<sid>:<gen>:<i>)."""
    return {k.split(":")[3] for k in keys if k.count(":") == 4}


async def test_round_trip_in_several_chunks(store, client, namespace):
    blob = os.urandom(4 * CHUNK + 500)
    assert await store.get("s1") is None
    await store.put("s1", blob)
    assert await store.get("s1") == blob
    keys = keys_of(client, namespace)
    assert len(keys) == 1 + 5  # the manifest and five chunks
    assert f"{namespace}:snap:s1" in keys
    assert all(0 < client.ttl(key) <= TTL_S + 300 for key in keys)


async def test_empty_and_exact_multiple_blobs(store):
    for blob in (b"", os.urandom(CHUNK), os.urandom(3 * CHUNK)):
        await store.put("s1", blob)
        assert await store.get("s1") == blob


async def test_overwrite_keeps_only_the_new_generation(store, client, namespace):
    await store.put("s1", os.urandom(5 * CHUNK))
    first = generations(keys_of(client, namespace))
    await store.put("s1", os.urandom(2 * CHUNK + 1))
    keys = keys_of(client, namespace)
    assert len(keys) == 1 + 3
    (second,) = generations(keys)
    assert {second} != first
    assert all(client.ttl(key) > 0 for key in keys)


async def test_crash_before_the_switch_leaves_the_old_snapshot(
    store, client, namespace
):
    old, new = os.urandom(3 * CHUNK), os.urandom(4 * CHUNK)
    await store.put("s1", old)
    # A writer that dies after its chunks, before the manifest switch.
    await store._write_chunks("s1", new)
    assert await store.get("s1") == old
    keys = keys_of(client, namespace)
    assert len(generations(keys)) == 2
    assert all(client.ttl(key) > 0 for key in keys), "orphans must expire"
    await store.put("s1", new)
    assert await store.get("s1") == new
    await store.delete("s1")
    assert keys_of(client, namespace) == []
    assert await store.get("s1") is None


async def test_missing_and_corrupted_chunks_are_detected(store, client, namespace):
    await store.put("s1", os.urandom(3 * CHUNK))
    (generation,) = generations(keys_of(client, namespace))
    chunk = f"{namespace}:snap:s1:{generation}:1"
    saved = client.get(chunk)

    client.set(chunk, bytes(len(saved)))
    with pytest.raises(SnapshotCorrupt, match="SHA-256 mismatch"):
        await store.get("s1")
    client.set(chunk, saved[:-1])
    with pytest.raises(SnapshotCorrupt, match="2999 bytes stored"):
        await store.get("s1")
    client.delete(chunk)
    with pytest.raises(SnapshotMissing, match=r"chunks \[1\] .* missing"):
        await store.get("s1")
    client.set(f"{namespace}:snap:s1", b"{not json")
    with pytest.raises(SnapshotCorrupt, match="unreadable manifest"):
        await store.get("s1")
    # A put over a broken snapshot still works.
    await store.put("s1", b"fresh")
    assert await store.get("s1") == b"fresh"


async def test_session_ids_cannot_escape_their_keys(store):
    for bad in ("a:b", "", "a*", "a b"):
        with pytest.raises(ValueError, match="session id"):
            await store.put(bad, b"x")


async def test_a_session_snapshot_through_the_store(tiny, store):
    loaded, _ = tiny
    engine = Engine(loaded)
    session = engine.open_session(None, SamplingParams(max_new_tokens=3))
    run_turn(engine, session, "Hello")
    blob = encode_snapshot(session, loaded.fingerprint)
    await store.put(session.session_id, blob)
    stored = await store.get(session.session_id)
    restored = decode_snapshot(
        stored, loaded.fingerprint, engine.cache_shape, loaded.rotary
    )
    assert restored.cache.token_ids == session.cache.token_ids


async def test_redis_outage_is_reported_and_survived(outage_redis, namespace):
    store = RedisSnapshotStore(
        url_of(outage_redis), namespace=namespace, chunk_bytes=CHUNK, timeout_s=1.0
    )
    blob = os.urandom(2 * CHUNK)
    await store.put("s1", blob)
    outage_redis.stop()
    try:
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await store.put("s1", blob)
        with pytest.raises(StoreUnavailable):
            await store.get("s1")
        with pytest.raises(StoreUnavailable):
            await store.delete("s1")
    finally:
        restart_redis(outage_redis)
    # The restarted server kept nothing (no persistence); the store reconnects.
    await store.put("s1", blob)
    assert await store.get("s1") == blob
    await store.close()


async def test_a_read_racing_a_put_retries_on_the_new_generation(store, redis_url):
    old, new = os.urandom(3 * CHUNK), os.urandom(2 * CHUNK)
    await store.put("s1", old)
    writer = RedisSnapshotStore(redis_url, namespace=store.namespace, chunk_bytes=CHUNK)
    read_manifest = store._read_manifest
    calls = 0

    async def put_after_first_read(session_id: str):
        nonlocal calls
        calls += 1
        manifest = await read_manifest(session_id)
        if calls == 1:  # the reader holds the old manifest; a put replaces it
            await writer.put(session_id, new)
        return manifest

    store._read_manifest = put_after_first_read
    assert await store.get("s1") == new
    assert calls == 3  # old manifest, the check that it changed, the new one
    await writer.close()
