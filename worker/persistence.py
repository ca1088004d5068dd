"""Sessions that outlive their worker: snapshots, restores and offload.

After every settled change (a turn ended, a finished reply was cut) the
session is captured under the engine lock and written to the snapshot store
in the background, newest first: a write never replaces a newer snapshot with
an older one. A resume for a session this worker does not hold restores it
from its snapshot. Sessions idle longer than `offload_after_s`, with no
stream attached, are snapshotted and freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from services.snapshot_store import RedisSnapshotStore, StoreUnavailable
from worker.engine import Engine
from worker.errors import SessionNotFound, SnapshotError, SnapshotRefused, Unavailable
from worker.session import Session
from worker.snapshot import SessionImage, decode_snapshot, encode_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PersistenceConfig:
    snapshot_every_turn: bool = True
    offload_after_s: float | None = 300.0
    offload_check_s: float = 5.0

    def __post_init__(self) -> None:
        if self.offload_after_s is not None and self.offload_after_s <= 0:
            raise ValueError("offload_after_s must be positive (or None: never)")


CLOSED_REMEMBERED = 4096  # closed sessions whose late snapshots are dropped


class SessionPersistence:
    """Keeps each session's newest snapshot in the store."""

    def __init__(
        self,
        engine: Engine,
        store: RedisSnapshotStore,
        config: PersistenceConfig | None = None,
    ):
        self.engine = engine
        self.store = store
        self.config = config or PersistenceConfig()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._versions: dict[str, int] = {}  # newest captured, per session
        self._written: dict[str, int] = {}  # newest stored, per session
        self._locks: dict[str, asyncio.Lock] = {}
        # Sessions closed lately, oldest first: a snapshot still on its way
        # for one of them is dropped, never stored after the delete.
        self._closed: dict[str, None] = {}
        self._tasks: set[asyncio.Task] = set()
        self._offloader: asyncio.Task | None = None
        self.fingerprint = engine.loaded.fingerprint

    def start(self) -> None:
        """Hook into the engine; call from the event loop that serves gRPC."""
        self._loop = asyncio.get_running_loop()
        if self.config.snapshot_every_turn:
            self.engine.on_settled = self._on_settled
        if self.config.offload_after_s is not None:
            self._offloader = asyncio.create_task(self._offload_loop())

    async def stop(self) -> None:
        """Flush the snapshots still being written, then stop."""
        if self._offloader is not None:
            self._offloader.cancel()
        self.engine.on_settled = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_settled(self, session: Session) -> None:
        """Engine thread, under its lock: capture now, write later."""
        from worker.snapshot import capture_session

        image = capture_session(session)
        version = self._versions.get(session.session_id, 0) + 1
        self._versions[session.session_id] = version
        self._loop.call_soon_threadsafe(self._spawn, image, version)

    def _spawn(self, image: SessionImage, version: int) -> None:
        task = asyncio.create_task(self._write(image, version))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, image: SessionImage, version: int) -> bool:
        session_id = image.session_id
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            if self._written.get(session_id, 0) >= version:
                return True  # a newer snapshot is already stored
            if session_id in self._closed:
                return False
            blob = await asyncio.to_thread(encode_image, image, self.fingerprint)
            if session_id in self._closed:
                return False
            started = time.perf_counter()
            try:
                await self.store.put(session_id, blob)
            except StoreUnavailable as error:
                self.engine.metrics.snapshot_failures.inc()
                log.warning("snapshot of session %s not stored: %s", session_id, error)
                return False
            self._written[session_id] = version
            self.engine.metrics.snapshot_seconds.observe(time.perf_counter() - started)
            self.engine.metrics.snapshot_bytes.observe(len(blob))
            return True

    async def snapshot_now(self, session_id: str) -> bool:
        """Capture and store a session at once (offload, drain)."""
        image = await asyncio.to_thread(self.engine.capture, session_id)
        version = self._versions.get(session_id, 0) + 1
        self._versions[session_id] = version
        return await self._write(image, version)

    async def restore(self, session_id: str) -> Session:
        """Load a session's snapshot into this worker's engine."""
        try:
            blob = await self.store.get(session_id)
        except StoreUnavailable as error:
            raise Unavailable(f"snapshots are unavailable: {error}") from error
        except SnapshotError as error:  # missing or corrupt chunks
            raise SnapshotRefused(f"session {session_id[:80]!r}: {error}") from error
        if blob is None:
            raise SessionNotFound(
                f"no session {session_id!r} here and no snapshot of it"
            )
        loaded = self.engine.loaded
        vocab = loaded.model.get_input_embeddings().num_embeddings
        try:
            session = await asyncio.to_thread(
                decode_snapshot,
                blob,
                self.fingerprint,
                self.engine.cache_shape,
                loaded.rotary,
                vocab,
            )
        except SnapshotError as error:
            raise SnapshotRefused(f"session {session_id[:80]!r}: {error}") from error
        self.engine.adopt_session(session)
        self.engine.metrics.restores.inc()
        return session

    async def forget(self, session_id: str) -> None:
        """The session was closed: its snapshot goes too, after any write of
        it already under way; none is written after."""
        self._closed[session_id] = None
        while len(self._closed) > CLOSED_REMEMBERED:
            del self._closed[next(iter(self._closed))]
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            try:
                await self.store.delete(session_id)
            except StoreUnavailable as error:
                log.warning(
                    "snapshot of closed session %s not deleted: %s", session_id, error
                )
        self._versions.pop(session_id, None)
        self._written.pop(session_id, None)
        self._locks.pop(session_id, None)

    async def offload_idle(self) -> list[str]:
        """Snapshot and free every session idle past the threshold."""
        offloaded = []
        for session_id in self.engine.idle_sessions(self.config.offload_after_s):
            try:
                stored = await self.snapshot_now(session_id)
            except Exception as error:  # the session got busy or closed meanwhile
                log.debug("not offloading %s: %s", session_id, error)
                continue
            if stored and session_id in self.engine.idle_sessions(0):
                self.engine.close_session(session_id)
                self.engine.metrics.offloads.inc()
                offloaded.append(session_id)
                log.info("session %s offloaded to its snapshot", session_id)
        return offloaded

    async def _offload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.offload_check_s)
            try:
                await self.offload_idle()
            except Exception:
                log.exception("offload pass failed")
