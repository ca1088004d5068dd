"""Session snapshots in Redis, written aside and switched atomically.

Keys, all under `<namespace>:snap:<session_id>`, all with a TTL:

    <ns>:snap:<sid>                 manifest: JSON {generation, chunks, nbytes,
                                    sha256} of the snapshot readers see
    <ns>:snap:<sid>:<gen>:<i>       chunk i of generation <gen>

A put writes every chunk of a new generation first, then replaces the
manifest in one command (SET ... GET), then deletes the chunks of the
generation it displaced. A writer that dies before the switch leaves the
previous manifest and its chunks untouched, and its own chunks expire with
their TTL. Chunks live a little longer than their manifest so that a
manifest never outlives the chunks it points to. Redis strings stop at
512 MB, hence the chunks.

A reader takes the manifest, then the chunks, and checks length and SHA-256.
If chunks are missing because a put switched generations in between, it
reads again; if the manifest still points to them, they are lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from worker.errors import SnapshotError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024
MAX_CHUNK_BYTES = 512 * 1024 * 1024  # Redis' limit on one string
_SESSION_ID = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
_READ_ATTEMPTS = 3


class StoreUnavailable(RuntimeError):
    """Redis could not be reached or refused the command; try again later."""


class SnapshotMissing(SnapshotError):
    """The manifest names chunks that are gone (expired or deleted)."""


class SnapshotCorrupt(SnapshotError):
    """The stored snapshot does not match its manifest."""


@dataclass(frozen=True)
class Manifest:
    generation: str
    chunks: int
    nbytes: int
    sha256: str


class RedisSnapshotStore:
    """Snapshot blobs by session id, in chunks, every key with a TTL.

    One writer per session at a time is assumed (the worker holding it);
    concurrent puts still leave one complete snapshot, the last switched.
    Session ids are limited to [A-Za-z0-9_.-] so that no session's keys can
    fall under another's. A Redis that is down or slow raises
    StoreUnavailable after `retries` quick retries and `timeout_s` per
    socket operation, so a caller learns in seconds rather than hanging.
    """

    def __init__(
        self,
        url: str,
        namespace: str = "sinkserve",
        ttl_s: int = 7 * 24 * 3600,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout_s: float = 5.0,
        retries: int = 1,
    ):
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}]")
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        self.redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        )
        self.namespace = namespace
        self.ttl_s = ttl_s
        # Chunks outlive their manifest, which is written after them.
        self.chunk_ttl_s = ttl_s + 300
        self.chunk_bytes = chunk_bytes

    def manifest_key(self, session_id: str) -> str:
        if not _SESSION_ID.fullmatch(session_id):
            # ':' would let one session's keys collide with another's.
            raise ValueError(f"session id {session_id!r} is not [A-Za-z0-9_.-]+")
        return f"{self.namespace}:snap:{session_id}"

    def chunk_key(self, session_id: str, generation: str, index: int) -> str:
        return f"{self.manifest_key(session_id)}:{generation}:{index}"

    async def put(self, session_id: str, blob: bytes) -> None:
        """Store a snapshot, replacing the previous one all at once."""
        manifest = await self._write_chunks(session_id, blob)
        previous = await self._switch(session_id, manifest)
        if previous is not None and previous.generation != manifest.generation:
            try:
                await self._delete_chunks(session_id, previous)
            except StoreUnavailable:
                log.warning(
                    "snapshot %s: old generation %s left to expire",
                    session_id,
                    previous.generation,
                )
        log.debug(
            "snapshot %s: %d bytes in %d chunks", session_id, len(blob), manifest.chunks
        )

    async def get(self, session_id: str) -> bytes | None:
        """The stored snapshot, checked against its manifest; None if none."""
        for _ in range(_READ_ATTEMPTS):
            manifest = await self._read_manifest(session_id)
            if manifest is None:
                return None
            keys = [
                self.chunk_key(session_id, manifest.generation, i)
                for i in range(manifest.chunks)
            ]
            async with self._unavailable():
                chunks = await self.redis.mget(keys) if keys else []
            missing = [i for i, chunk in enumerate(chunks) if chunk is None]
            if not missing:
                return self._verified(session_id, manifest, chunks)
            current = await self._read_manifest(session_id)
            if current is None or current.generation == manifest.generation:
                raise SnapshotMissing(
                    f"snapshot {session_id}: chunks {missing} of generation "
                    f"{manifest.generation} ({manifest.chunks} chunks) are missing"
                )
        raise SnapshotMissing(f"snapshot {session_id} kept changing while read")

    async def delete(self, session_id: str) -> None:
        """Remove the snapshot and every chunk under it, orphans included."""
        key = self.manifest_key(session_id)
        async with self._unavailable():
            await self.redis.delete(key)
            batch = []
            async for chunk_key in self.redis.scan_iter(match=f"{key}:*", count=500):
                batch.append(chunk_key)
                if len(batch) >= 500:
                    await self.redis.delete(*batch)
                    batch = []
            if batch:
                await self.redis.delete(*batch)

    async def close(self) -> None:
        await self.redis.aclose()

    # -- the steps of a put (separate, so a test can stop between them) ----

    async def _write_chunks(self, session_id: str, blob: bytes) -> Manifest:
        """Write a new generation's chunks; readers do not see them yet."""
        view = memoryview(blob)
        generation = uuid.uuid4().hex[:16]
        size = self.chunk_bytes
        count = (len(view) + size - 1) // size
        async with self._unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in range(count):
                    key = self.chunk_key(session_id, generation, i)
                    chunk = bytes(view[i * size : (i + 1) * size])
                    pipe.set(key, chunk, ex=self.chunk_ttl_s)
                await pipe.execute()
        return Manifest(generation, count, len(view), hashlib.sha256(view).hexdigest())

    async def _switch(self, session_id: str, manifest: Manifest) -> Manifest | None:
        """Point readers at `manifest` in one command; return the one replaced."""
        value = json.dumps(asdict(manifest))
        async with self._unavailable():
            old = await self.redis.set(
                self.manifest_key(session_id), value, ex=self.ttl_s, get=True
            )
        return self._parse_manifest(session_id, old, strict=False)

    async def _delete_chunks(self, session_id: str, manifest: Manifest) -> None:
        keys = [
            self.chunk_key(session_id, manifest.generation, i)
            for i in range(manifest.chunks)
        ]
        if keys:
            async with self._unavailable():
                await self.redis.delete(*keys)

    async def _read_manifest(self, session_id: str) -> Manifest | None:
        async with self._unavailable():
            raw = await self.redis.get(self.manifest_key(session_id))
        return self._parse_manifest(session_id, raw, strict=True)

    def _parse_manifest(
        self, session_id: str, raw: bytes | None, strict: bool
    ) -> Manifest | None:
        """A manifest from its JSON; a bad one raises, or is None if not strict."""
        if raw is None:
            return None
        try:
            manifest = Manifest(**json.loads(raw))
        except (ValueError, TypeError):
            manifest = None
        valid = (
            manifest is not None
            and isinstance(manifest.generation, str)
            and _SESSION_ID.fullmatch(manifest.generation) is not None
            and type(manifest.chunks) is int
            and type(manifest.nbytes) is int
            and 0 <= manifest.chunks <= manifest.nbytes
            and isinstance(manifest.sha256, str)
        )
        if valid:
            return manifest
        if strict:
            raise SnapshotCorrupt(f"snapshot {session_id}: unreadable manifest")
        log.warning("snapshot %s: replaced an unreadable manifest", session_id)
        return None

    def _verified(
        self, session_id: str, manifest: Manifest, chunks: list[bytes]
    ) -> bytes:
        blob = b"".join(chunks)
        if len(blob) != manifest.nbytes:
            raise SnapshotCorrupt(
                f"snapshot {session_id}: {len(blob)} bytes stored, the manifest "
                f"says {manifest.nbytes}"
            )
        if hashlib.sha256(blob).hexdigest() != manifest.sha256:
            raise SnapshotCorrupt(f"snapshot {session_id}: SHA-256 mismatch")
        return blob

    @asynccontextmanager
    async def _unavailable(self) -> AsyncIterator[None]:
        """Turn Redis and socket errors into StoreUnavailable."""
        try:
            yield
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"snapshot store unreachable: {e}") from e
