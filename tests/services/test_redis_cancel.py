"""Cancelled Redis calls never hand a later call someone else's reply.

A gateway cancels a directory lookup whenever its client goes away, and a
worker cancels snapshot reads and writes when it drains. If a request were
cancelled after its command was sent but before its reply was read, and the
connection went back to the pool as it was, the next command on it would
read the stale reply: another session's worker, another session's snapshot.
These tests cancel many calls at random points, while the server is paused
(CLIENT PAUSE holds every command in flight) or while large replies are
being read, and then check that every call returns its own key's value.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from pytest_redis import factories

from services.directory import RedisDirectory
from services.snapshot_store import RedisSnapshotStore

# A server of its own: CLIENT PAUSE stops every client of the server.
cancel_redis = factories.redis_proc(port=None)

pytestmark = pytest.mark.timeout(120)

SEEDS = [0, 1, 2]
KEYS = 48
ROUNDS = 60
BATCH = 24
CHUNK = 64 * 1024


def url_of(proc) -> str:
    return f"redis://{proc.host}:{proc.port}/0"


@pytest.fixture()
async def admin(cancel_redis) -> AsyncIterator[aioredis.Redis]:
    """A separate client for CLIENT PAUSE and INFO; it is never cancelled."""
    client = aioredis.Redis.from_url(url_of(cancel_redis))
    yield client
    await client.aclose()


def value_size(rng: random.Random) -> int:
    """Mostly small values, as real ones are; some large enough that their
    reply takes many socket reads, so a cancel can land in the middle."""
    return rng.choice([0, 10, 200, 4_000, 70_000, 300_000, 1_000_000])


async def hammer(
    call: Callable[[str], Awaitable[object]],
    expected: Callable[[str, object], bool],
    keys: list[str],
    admin: aioredis.Redis,
    rng: random.Random,
) -> Counter:
    """Rounds of concurrent calls, most cancelled at a random moment.

    Every call that does complete must return its own key's value: that is
    where a stray reply would show up, on a connection a cancelled call gave
    back to the pool.
    """
    outcomes: Counter = Counter()
    loop = asyncio.get_running_loop()
    for _ in range(ROUNDS):
        batch = rng.sample(keys, BATCH)
        tasks = [asyncio.create_task(call(key)) for key in batch]
        pause_ms = rng.choice([0, 0, 5, 20, 50])
        if pause_ms:
            # After the calls have sent their commands, or while they send.
            await asyncio.sleep(rng.uniform(0, 0.002))
            await admin.client_pause(pause_ms, all=True)
        horizon_s = (pause_ms / 1000 or 0.003) * 1.2
        for task in tasks:
            if rng.random() < 0.8:
                loop.call_later(rng.uniform(0, horizon_s), task.cancel)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for key, result in zip(batch, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                outcomes["cancelled"] += 1
            elif isinstance(result, BaseException):
                raise AssertionError(f"call for {key} failed: {result!r}") from result
            else:
                assert expected(key, result), f"{key} got another key's value"
                outcomes["completed"] += 1
    return outcomes


async def check_all(
    call: Callable[[str], Awaitable[object]],
    expected: Callable[[str, object], bool],
    keys: list[str],
    rng: random.Random,
    times: int = 5,
) -> None:
    """Every key, many times over, concurrently and one by one."""
    for _ in range(times):
        shuffled = rng.sample(keys, len(keys))
        results = await asyncio.gather(*(call(key) for key in shuffled))
        for key, result in zip(shuffled, results, strict=True):
            assert expected(key, result), f"{key} got another key's value"
    for key in rng.sample(keys, len(keys)):
        assert expected(key, await call(key)), f"{key} got another key's value"


async def connections_settle(admin: aioredis.Redis, limit: int) -> int:
    """Server-side connections, once the ones closed on cancel are gone.

    A call cancelled mid-command must close its connection or return it to
    the pool, never keep it open: so at most one per concurrent call (the
    checks run one call per key at once), plus ours.
    """
    for _ in range(40):
        clients = (await admin.info("clients"))["connected_clients"]
        if clients <= limit:
            return clients
        await asyncio.sleep(0.05)
    return clients


async def drop_namespace(admin: aioredis.Redis, namespace: str) -> None:
    keys = [key async for key in admin.scan_iter(f"{namespace}:*")]
    if keys:
        await admin.delete(*keys)


@pytest.mark.parametrize("seed", SEEDS)
async def test_cancelled_directory_lookups_leave_no_stray_replies(
    cancel_redis, admin, seed
):
    rng = random.Random(seed)
    namespace = f"cancel-{uuid.uuid4().hex[:8]}"
    directory = RedisDirectory(url_of(cancel_redis), namespace=namespace)
    try:
        keys = [f"session-{i}" for i in range(KEYS)]
        # Distinct per key, recognisable at the front, of mixed sizes.
        values = {key: f"{key}|" + "x" * value_size(rng) for key in keys}
        for key, value in values.items():
            await directory.put_session(key, value)

        def expected(key: str, result: object) -> bool:
            return result == values[key]

        outcomes = await hammer(directory.get_session, expected, keys, admin, rng)
        # Enough of both, or the test proves nothing.
        assert outcomes["cancelled"] > ROUNDS * BATCH // 2, outcomes
        assert outcomes["completed"] > ROUNDS, outcomes
        await check_all(directory.get_session, expected, keys, rng)
        assert await connections_settle(admin, KEYS + 2) <= KEYS + 2
    finally:
        await directory.close()
        await drop_namespace(admin, namespace)


@pytest.mark.parametrize("seed", SEEDS)
async def test_cancelled_snapshot_reads_and_writes_leave_no_stray_replies(
    cancel_redis, admin, seed
):
    """Gets and puts of many sessions, cancelled at random. A cancelled put
    may or may not have switched its manifest, but every read returns one of
    the session's own snapshots, whole."""
    rng = random.Random(seed)
    namespace = f"cancel-{uuid.uuid4().hex[:8]}"
    store = RedisSnapshotStore(
        url_of(cancel_redis), namespace=namespace, chunk_bytes=CHUNK
    )
    try:
        keys = [f"session-{i}" for i in range(KEYS)]
        versions: dict[str, list[bytes]] = {}
        for key in keys:
            blob = key.encode() + b"|" + rng.randbytes(value_size(rng))
            versions[key] = [blob]
            await store.put(key, blob)

        def expected(key: str, result: object) -> bool:
            return isinstance(result, bytes) and result in versions[key]

        async def get_or_put(key: str) -> bytes | None:
            # Half the calls overwrite the session with a new version first;
            # recorded before the put, since a cancelled put may still land.
            if rng.random() < 0.5:
                blob = b"%s|v%d|" % (key.encode(), len(versions[key]))
                blob += rng.randbytes(value_size(rng))
                versions[key].append(blob)
                await store.put(key, blob)
            return await store.get(key)

        outcomes = await hammer(get_or_put, expected, keys, admin, rng)
        assert outcomes["cancelled"] > ROUNDS * BATCH // 2, outcomes
        assert outcomes["completed"] > ROUNDS, outcomes
        await check_all(store.get, expected, keys, rng)

        # A fresh put on every connection state left behind reads back as is.
        for key in keys:
            blob = key.encode() + b"|final|" + rng.randbytes(value_size(rng))
            versions[key] = [blob]
            await store.put(key, blob)
        await check_all(store.get, expected, keys, rng)
        digest = {k: hashlib.sha256(v[0]).hexdigest() for k, v in versions.items()}
        for key in keys:
            got = await store.get(key)
            assert hashlib.sha256(got).hexdigest() == digest[key]
        assert await connections_settle(admin, KEYS + 2) <= KEYS + 2
    finally:
        await store.close()
        await drop_namespace(admin, namespace)
