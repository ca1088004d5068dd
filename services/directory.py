"""The session directory: which worker holds each session, and which live.

Two implementations behind one interface: in memory (one process, the
embedded default) and Redis (shared by any number of gateways and workers).
Every Redis key is namespaced and carries a TTL, so nothing grows without
bound: a session's affinity lives as long as the session is used, a worker's
entry as long as it keeps its heartbeat.
"""

from __future__ import annotations

import abc
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

P = ParamSpec("P")
R = TypeVar("R")


def _redis_call(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Redis failures surface as DirectoryUnavailable, with the cause."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError) as error:
            raise DirectoryUnavailable(f"{type(error).__name__}: {error}") from error

    return wrapper


class DirectoryUnavailable(RuntimeError):
    """The directory's backing store cannot be reached."""


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    address: str  # host:port the gateway dials


class SessionDirectory(abc.ABC):
    """Session-to-worker affinity and the registry of live workers."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> str | None:
        """The worker id holding the session, or None."""

    @abc.abstractmethod
    async def put_session(self, session_id: str, worker_id: str) -> None:
        """Record (or refresh) a session's affinity."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> None: ...

    @abc.abstractmethod
    async def register_worker(self, info: WorkerInfo, ttl_s: float | None) -> None:
        """Add or refresh a worker; with a TTL it expires unless refreshed."""

    @abc.abstractmethod
    async def unregister_worker(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    async def live_workers(self) -> list[WorkerInfo]: ...

    async def worker(self, worker_id: str) -> WorkerInfo | None:
        for info in await self.live_workers():
            if info.worker_id == worker_id:
                return info
        return None

    async def close(self) -> None:
        return None


class MemoryDirectory(SessionDirectory):
    """The embedded default: one process, no Redis."""

    def __init__(self) -> None:
        self._sessions: dict[str, str] = {}
        self._workers: dict[str, tuple[WorkerInfo, float | None]] = {}

    async def get_session(self, session_id: str) -> str | None:
        return self._sessions.get(session_id)

    async def put_session(self, session_id: str, worker_id: str) -> None:
        self._sessions[session_id] = worker_id

    async def delete_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def register_worker(self, info: WorkerInfo, ttl_s: float | None) -> None:
        expires = time.monotonic() + ttl_s if ttl_s else None
        self._workers[info.worker_id] = (info, expires)

    async def unregister_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def live_workers(self) -> list[WorkerInfo]:
        now = time.monotonic()
        return [
            info
            for info, expires in self._workers.values()
            if expires is None or expires > now
        ]


class RedisDirectory(SessionDirectory):
    """Shared state in Redis under `<namespace>:`, every key with a TTL."""

    def __init__(
        self,
        url: str,
        namespace: str = "sinkserve",
        session_ttl_s: int = 7 * 24 * 3600,
        static_worker_ttl_s: int = 24 * 3600,
    ):
        # Retries cover a connection the server closed while it sat idle.
        self.redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self.namespace = namespace
        self.session_ttl_s = session_ttl_s
        self.static_worker_ttl_s = static_worker_ttl_s

    def _session_key(self, session_id: str) -> str:
        return f"{self.namespace}:session:{session_id}"

    def _worker_key(self, worker_id: str) -> str:
        return f"{self.namespace}:worker:{worker_id}"

    @_redis_call
    async def get_session(self, session_id: str) -> str | None:
        key = self._session_key(session_id)
        worker_id = await self.redis.get(key)
        if worker_id is not None:
            await self.redis.expire(key, self.session_ttl_s)
        return worker_id

    @_redis_call
    async def put_session(self, session_id: str, worker_id: str) -> None:
        await self.redis.set(
            self._session_key(session_id), worker_id, ex=self.session_ttl_s
        )

    @_redis_call
    async def delete_session(self, session_id: str) -> None:
        await self.redis.delete(self._session_key(session_id))

    @_redis_call
    async def register_worker(self, info: WorkerInfo, ttl_s: float | None) -> None:
        ttl_ms = int((ttl_s or self.static_worker_ttl_s) * 1000)
        await self.redis.set(self._worker_key(info.worker_id), info.address, px=ttl_ms)

    @_redis_call
    async def unregister_worker(self, worker_id: str) -> None:
        await self.redis.delete(self._worker_key(worker_id))

    @_redis_call
    async def live_workers(self) -> list[WorkerInfo]:
        prefix = self._worker_key("")
        workers = []
        async for key in self.redis.scan_iter(match=f"{prefix}*", count=100):
            address = await self.redis.get(key)
            if address is not None:
                workers.append(WorkerInfo(key[len(prefix) :], address))
        return sorted(workers, key=lambda w: w.worker_id)

    async def close(self) -> None:
        await self.redis.aclose()
