"""The engine: one thread that runs every session's model steps.

Each step packs the next token of every generating session and, within a
token budget, one prefill chunk, into a single forward pass. Sessions join and
leave between steps. Requests arrive from the gRPC event loop through the
public methods, which only change session state under the lock; the forward
pass runs outside it, and events go back through each session's sink.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from worker import barge_in
from worker.chat import ChatFormat
from worker.detokenizer import StreamDecoder
from worker.errors import (
    InvalidRequest,
    LimitExceeded,
    SessionBusy,
    SessionNotFound,
    Unavailable,
)
from worker.kv_pool import KVPool
from worker.metrics import WorkerMetrics
from worker.model import LoadedModel
from worker.runner import ModelRunner
from worker.session import (
    CacheConfig,
    EndReason,
    EvictionPolicy,
    SamplingParams,
    Session,
    SessionState,
    TurnProgress,
)
from worker.sink_cache import CacheShape, SinkCache
from worker.snapshot import SessionImage, capture_session
from worker.stepping import Stepping

log = logging.getLogger(__name__)
# Tokens average about 4 characters; no real text needs more than this.
_MAX_CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class EngineConfig:
    """Limits and defaults of one worker's engine."""

    max_sessions: int = 64
    sink_size: int = 4
    window_size: int = 1020
    max_sink_size: int = 64
    max_window_size: int = 4092
    evict_size: int = 32
    prefill_chunk_size: int = 256
    max_turn_tokens: int = 8192
    max_new_tokens: int = 256
    max_new_tokens_limit: int = 4096
    eviction: EvictionPolicy = EvictionPolicy.TOKENS
    pool_block_rows: int = 16  # caches per block of the shared KV pool

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if self.pool_block_rows < 1:
            raise ValueError("pool_block_rows must be >= 1")
        if not 0 <= self.sink_size <= self.max_sink_size:
            raise ValueError("sink_size must be in [0, max_sink_size]")
        if not 1 <= self.window_size <= self.max_window_size:
            raise ValueError("window_size must be in [1, max_window_size]")
        if self.evict_size < 1 or self.prefill_chunk_size < 1:
            raise ValueError("evict_size and prefill_chunk_size must be >= 1")
        if not 1 <= self.max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError("max_new_tokens must be in [1, max_new_tokens_limit]")


class Engine(Stepping):
    """Owns the sessions of a worker and steps them through the model."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        metrics: WorkerMetrics | None = None,
    ):
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.metrics = metrics or WorkerMetrics()
        self.runner = ModelRunner(loaded)
        self.chat = ChatFormat(loaded.tokenizer)
        self.end_ids = set(self.chat.end_of_turn_ids)
        self.sessions: dict[str, Session] = {}
        self._decoders: dict[str, StreamDecoder] = {}
        self._prefill_queue: list[str] = []
        self._in_flight: set[str] = set()
        # Called under the lock whenever a session settles idle with new state
        # (a turn ended, a finished reply was cut): snapshots hang here.
        self.on_settled: Callable[[Session], None] | None = None
        self._cond = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._thread: threading.Thread | None = None
        mc = loaded.model.config
        head_dim = (
            getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        )
        param = next(loaded.model.parameters())
        self.cache_shape = CacheShape(
            mc.num_hidden_layers,
            mc.num_key_value_heads,
            head_dim,
            param.dtype,
            param.device,
        )
        # Every session's cache is a row of this pool: decoding sessions in
        # neighbouring rows write and attend together.
        self.kv_pool = KVPool(self.cache_shape, self.config.pool_block_rows)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="sinkserve-engine", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    @property
    def free_slots(self) -> int:
        if not self._accepting:
            return 0
        return max(self.config.max_sessions - len(self.sessions), 0)

    # -- requests (called from the event loop) ------------------------------

    def open_session(
        self,
        system_prompt: str | None,
        sampling: SamplingParams,
        sink_size: int | None = None,
        window_size: int | None = None,
        session_id: str | None = None,
        eviction: EvictionPolicy | None = None,
    ) -> Session:
        cfg = self.config
        cache_config = self._cache_config(sink_size, window_size, eviction)
        sampling.validate(cfg.max_new_tokens_limit)
        if system_prompt is not None:
            self._check_chars(system_prompt, "the system prompt")
        if system_prompt is not None and not system_prompt.strip():
            raise InvalidRequest("the system prompt is blank; omit it for the default")
        system_ids = self.chat.system_tokens(system_prompt)
        if len(system_ids) > cache_config.cache_size // 2:
            raise LimitExceeded(
                f"the system prompt is {len(system_ids)} tokens; it is pinned in the "
                "cache and may take at most half of it "
                f"({cache_config.cache_size // 2})"
            )
        with self._cond:
            session_id = session_id or uuid.uuid4().hex
            self._check_room(session_id)
            cache = SinkCache(
                self.cache_shape,
                self.loaded.rotary,
                cache_config.sink_size,
                cache_config.window_size,
                cache_config.evict_size,
                whole_turns=cache_config.eviction is EvictionPolicy.TURNS,
                pool=self.kv_pool,
            )
            session = Session(session_id, cache, cache_config, sampling, system_ids)
            self.sessions[session_id] = session
            self._decoders[session_id] = StreamDecoder(
                self.loaded.tokenizer, self.end_ids
            )
            self._update_gauges()
        log.info(
            "session %s opened: cache %d+%d, %d system tokens",
            session_id,
            cache_config.sink_size,
            cache_config.window_size,
            len(system_ids),
        )
        return session

    def adopt_session(self, session: Session) -> None:
        """Take in a session rebuilt from a snapshot, as if opened here."""
        if session.cache.shape != self.cache_shape:
            raise InvalidRequest(
                "the snapshot's cache does not fit this worker's model"
            )
        if session.state is not SessionState.IDLE:
            raise InvalidRequest("only idle sessions can be adopted")
        self._cache_config(session.config.sink_size, session.config.window_size)
        session.sampling.validate(self.config.max_new_tokens_limit)
        with self._cond:
            self._check_room(session.session_id)
            if session.cache.block is None:
                session.cache.move_into(self.kv_pool)
            session.idle_since_s = time.monotonic()
            self.sessions[session.session_id] = session
            self._decoders[session.session_id] = StreamDecoder(
                self.loaded.tokenizer, self.end_ids
            )
            self._update_gauges()
        log.info(
            "session %s restored (%d tokens)", session.session_id, session.cache.length
        )

    def _check_room(self, session_id: str) -> None:
        """Under the lock: can this worker take one more session now?"""
        if not self._accepting:
            raise Unavailable("this worker is draining and takes no new sessions")
        if len(self.sessions) >= self.config.max_sessions:
            raise LimitExceeded(
                f"this worker holds its limit of {self.config.max_sessions} sessions"
            )
        if session_id in self.sessions:
            raise InvalidRequest(f"session {session_id} already exists")

    def capture(self, session_id: str) -> SessionImage:
        """Copy an idle session for a snapshot (encode it outside the lock)."""
        with self._cond:
            session = self.get(session_id)
            if session.busy:
                raise SessionBusy(f"session {session_id} is {session.state.value}")
            return capture_session(session)

    def idle_sessions(self, idle_for_s: float) -> list[str]:
        """Sessions idle, with no stream attached, for at least `idle_for_s`."""
        now = time.monotonic()
        with self._cond:
            return [
                s.session_id
                for s in self.sessions.values()
                if s.state is SessionState.IDLE
                and s.sink is None
                and now - s.idle_since_s >= idle_for_s
            ]

    def has_busy_sessions(self) -> bool:
        with self._cond:
            return any(s.busy for s in self.sessions.values())

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.state is SessionState.CLOSED:
            raise SessionNotFound(f"no session {session_id[:80]!r} on this worker")
        return session

    def submit_turn(
        self, session_id: str, text: str, max_new_tokens: int | None = None
    ) -> int:
        """Queue a user turn; returns its turn number."""
        if not text.strip():
            raise InvalidRequest("the user turn is empty")
        limit = self.config.max_new_tokens_limit
        if max_new_tokens is not None and not 1 <= max_new_tokens <= limit:
            raise InvalidRequest(
                f"max_new_tokens must be in [1, {limit}], got {max_new_tokens}"
            )
        with self._cond:
            session = self.get(session_id)
            if session.busy and session.turn.draft:
                self._update_draft(session, text, final=True)
                return session.turn.turn
            if session.busy:
                if session.turn.heard_limit is not None and session.queued_turn is None:
                    # Interrupted, not yet cut: this turn follows the cut.
                    self._check_turn_size(session, text, reply_closed=False)
                    session.queued_turn = (text, max_new_tokens)
                    return session.turn.turn + 1
                raise SessionBusy(
                    f"session {session_id} is still {session.state.value}: wait "
                    "for the turn to end (or interrupt it) before sending the next"
                )
            increment = self._check_turn_size(session, text, session.reply_closed)
            return self._start_turn(session, increment, max_new_tokens)

    def _check_chars(self, text: str, what: str) -> None:
        """Refuse absurd texts before tokenizing them (which takes time)."""
        limit = self.config.max_turn_tokens * _MAX_CHARS_PER_TOKEN
        if len(text) > limit:
            raise LimitExceeded(
                f"{what} is {len(text)} characters; the limit is {limit}"
            )

    def _check_turn_size(
        self, session: Session, text: str, reply_closed: bool
    ) -> list[int]:
        self._check_chars(text, "the turn")
        first = session.num_turns == 0
        increment = self.chat.user_tokens(text, first, reply_closed)
        if len(increment) > self.config.max_turn_tokens:
            raise LimitExceeded(
                f"the turn is {len(increment)} tokens; this worker's limit is "
                f"{self.config.max_turn_tokens}"
            )
        return increment

    def _start_turn(
        self, session: Session, increment: list[int], max_new_tokens: int | None
    ) -> int:
        turn = session.num_turns + 1
        session.turn = TurnProgress(
            turn=turn,
            max_new_tokens=max_new_tokens or session.sampling.max_new_tokens,
            submitted_s=time.perf_counter(),
            num_reused=session.cache.length,
            base_length=session.cache.length,
            saved_pending=list(session.pending),
            to_prefill=session.pending + [(t, turn) for t in increment],
            previous=session.last_turn,
            first=session.num_turns == 0,
            lead_closed=session.reply_closed,
        )
        session.last_turn = None
        session.num_turns = turn
        session.pending = []
        session.state = SessionState.PREFILLING
        self._prefill_queue.append(session.session_id)
        self.metrics.tokens_reused.inc(session.cache.length)
        self._cond.notify_all()
        return turn

    def partial_turn(self, session_id: str, text: str, final: bool) -> int:
        """A user turn still being spoken: prefill its stable part now.

        Each call replaces the previous partial text; the final one starts
        the reply. Returns the turn number.
        """
        if final and not text.strip():
            raise InvalidRequest("the final text of the user turn is empty")
        with self._cond:
            session = self.get(session_id)
            if session.busy and not session.turn.draft:
                raise SessionBusy(
                    f"session {session_id} is still {session.state.value}: interrupt "
                    "or wait for the reply before streaming the next turn"
                )
            if not session.busy:
                self._check_turn_size(session, text, session.reply_closed)
                self._start_turn(session, [], None)
                session.turn.streamed = True
                session.turn.draft = True
            self._update_draft(session, text, final)
            return session.turn.turn

    def _update_draft(self, session: Session, text: str, final: bool) -> None:
        if session.turn.final_received:
            raise SessionBusy("the turn's final text has arrived; wait for the reply")
        self._check_turn_size(session, text, session.turn.lead_closed)
        session.turn.final_received = final
        session.turn.draft_update = (text, final)
        if final:
            session.turn.submitted_s = time.perf_counter()
        if session.state is SessionState.LISTENING:
            session.state = SessionState.PREFILLING
            self._prefill_queue.append(session.session_id)
        self._cond.notify_all()

    def interrupt(
        self,
        session_id: str,
        heard_tokens: int | None = None,
        heard_chars: int | None = None,
    ) -> None:
        """The user barged in: keep only the heard part of the newest reply.

        A reply still being generated stops at the next step; a finished
        one is cut at once if the heard point lies inside it. Without a
        heard point, the last acknowledgement is the heard point.
        """
        kind = "acked"
        if heard_tokens is not None:
            kind = "tokens"
        elif heard_chars is not None:
            kind = "chars"
        with self._cond:
            session = self.get(session_id)
            turn = session.turn if session.busy else session.last_turn
            if turn is None:
                raise SessionBusy(f"session {session_id} has no reply to interrupt")
            if turn.draft and not turn.final_received:
                raise SessionBusy(
                    "a user turn is being streamed: interrupt the reply before "
                    "streaming the next turn"
                )
            heard = barge_in.resolve_heard(turn, heard_tokens, heard_chars)
            self.metrics.interruptions.labels(kind=kind).inc()
            if not session.busy:
                cut = barge_in.cut_reply(session, turn, heard, self.end_ids)
                self._report_cut(session, cut, kind)
                if cut.num_rolled_back:
                    self._settled(session)
                return
            previous = turn.heard_limit
            turn.heard_limit = heard if previous is None else min(previous, heard)
            turn.interrupt_kind = kind
            generating = session.state is SessionState.GENERATING
            if generating and session_id not in self._in_flight:
                self._finish_interrupted(session)
            self._cond.notify_all()

    def acknowledge(self, session_id: str, played_tokens: int) -> None:
        """The client has played the reply's first `played_tokens` tokens."""
        with self._cond:
            session = self.get(session_id)
            turn = session.turn if session.busy else session.last_turn
            if turn is not None:
                turn.num_acked = max(turn.num_acked, played_tokens)

    def cancel_turn(self, session_id: str) -> None:
        """Stop the session's turn at the next step (no-op when idle)."""
        with self._cond:
            session = self.sessions.get(session_id)
            if session is not None and session.turn is not None and session.busy:
                session.turn.cancelled = True
                session.queued_turn = None
                if session.state is SessionState.LISTENING:
                    self._roll_back_turn(session, EndReason.CANCELLED)
                self._cond.notify_all()

    def close_session(self, session_id: str) -> None:
        with self._cond:
            session = self.sessions.pop(session_id, None)
            self._decoders.pop(session_id, None)
            if session is None:
                raise SessionNotFound(f"no session {session_id[:80]!r} on this worker")
            session.state = SessionState.CLOSED
            session.sink = None
            self._update_gauges()
        log.info("session %s closed", session_id)

    def _cache_config(
        self,
        sink_size: int | None,
        window_size: int | None,
        eviction: EvictionPolicy | None = None,
    ) -> CacheConfig:
        cfg = self.config
        sink = cfg.sink_size if sink_size is None else sink_size
        window = cfg.window_size if window_size is None else window_size
        if sink < 0 or window < 1:
            raise InvalidRequest(
                f"sink_size must be >= 0 and window_size >= 1 (got {sink}, {window})"
            )
        if sink > cfg.max_sink_size or window > cfg.max_window_size:
            raise LimitExceeded(
                f"cache {sink}+{window} is over this worker's limits "
                f"(sink_size <= {cfg.max_sink_size}, "
                f"window_size <= {cfg.max_window_size})"
            )
        policy = eviction or cfg.eviction
        return CacheConfig(sink, window, min(cfg.evict_size, window), policy)

    def _update_gauges(self) -> None:
        caches = [s.cache for s in self.sessions.values()]
        generating = [
            s for s in self.sessions.values() if s.state is SessionState.GENERATING
        ]
        self.metrics.generating_sessions.set(len(generating))
        self.metrics.active_sessions.set(len(caches))
        self.metrics.cache_tokens.set(sum(c.length for c in caches))
        self.metrics.cache_capacity.set(sum(c.cache_size for c in caches))
        self.metrics.cache_bytes.set(sum(c.nbytes() for c in caches))
