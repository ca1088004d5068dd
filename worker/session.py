"""A session: one endless conversation, its cache and its current turn."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker.errors import InvalidRequest
from worker.sink_cache import Eviction, SinkCache


class SessionState(enum.Enum):
    IDLE = "idle"  # waiting for a user turn
    PREFILLING = "prefilling"  # feeding a turn's increment
    GENERATING = "generating"  # decoding a reply
    LISTENING = "listening"  # a streamed user turn is prefilled; more may come
    CLOSED = "closed"


class EvictionPolicy(enum.Enum):
    TOKENS = "tokens"  # the oldest unpinned tokens leave, a block at a time
    TURNS = "turns"  # the oldest unpinned turns leave whole


@dataclass(frozen=True)
class SamplingParams:
    """How a session picks its next token; temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int | None = None

    def validate(self, max_new_tokens_limit: int) -> None:
        if not (self.temperature == 0.0 or 0.01 <= self.temperature <= 5.0):
            raise InvalidRequest(
                "temperature must be 0 (greedy) or in [0.01, 5], "
                f"got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens must be in [1, {max_new_tokens_limit}], "
                f"got {self.max_new_tokens}"
            )


@dataclass(frozen=True)
class CacheConfig:
    sink_size: int
    window_size: int
    evict_size: int
    eviction: EvictionPolicy = EvictionPolicy.TOKENS

    @property
    def cache_size(self) -> int:
        return self.sink_size + self.window_size


# Events the engine hands to whoever listens to a session.


@dataclass(frozen=True)
class TokenEvent:
    turn: int
    index: int  # position of the token in the reply, from 0
    token_id: int
    text: str  # the text this token completes (may be empty mid-character)


@dataclass(frozen=True)
class EvictionEvent:
    turn: int
    eviction: Eviction


@dataclass(frozen=True)
class TurnStats:
    num_prefilled: int
    num_reused: int
    num_evicted: int
    num_generated: int
    ttft_ms: float
    decode_tokens_per_s: float
    cache_length: int


class EndReason(enum.Enum):
    STOP = "stop"  # the model ended its reply
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # the client went away or cancelled
    INTERRUPTED = "interrupted"  # the user barged in; cut to what was heard
    ERROR = "error"  # the worker failed while running the turn


@dataclass(frozen=True)
class TurnEndEvent:
    turn: int
    reason: EndReason
    stats: TurnStats
    text: str


@dataclass(frozen=True)
class Cut:
    """The outcome of one interruption."""

    turn: int
    num_kept: int  # reply tokens kept (the heard ones)
    num_rolled_back: int  # reply tokens discarded
    num_lost: int  # heard tokens that had already been evicted
    clamped: bool  # the listener claimed more than was generated
    text: str  # the kept reply text


@dataclass(frozen=True)
class InterruptedEvent:
    cut: Cut
    kind: str  # how the heard point was given: tokens, chars or acked


Event = TokenEvent | EvictionEvent | TurnEndEvent | InterruptedEvent
EventSink = Callable[[Event], None]


@dataclass
class TurnProgress:
    """What the current turn has done so far."""

    turn: int
    max_new_tokens: int
    submitted_s: float
    num_reused: int
    base_length: int  # cache length when the turn started
    saved_pending: list[tuple[int, int]]  # to restore if cancelled in prefill
    to_prefill: list[tuple[int, int]]  # (token_id, turn) still to feed
    num_prefilled: int = 0
    num_evicted: int = 0
    reply_ids: list[int] = field(default_factory=list)
    delta_texts: list[str] = field(default_factory=list)  # text of each reply token
    num_pending_reply: int = 0  # 1 while the last sampled token is not yet fed
    num_acked: int = 0  # reply tokens the client said it played
    heard_limit: int | None = None  # set by an interruption not yet applied
    interrupt_kind: str = ""
    previous: TurnProgress | None = None  # the turn before, restored on rollback
    first: bool = False  # the conversation's first user turn
    lead_closed: bool = True  # the reply before it ended with end-of-turn
    fed_ids: list[int] = field(default_factory=list)  # fed for this turn so far
    streamed: bool = False  # the user turn arrives as partial texts
    draft: bool = False  # its final text has not arrived yet
    draft_update: tuple[str, bool] | None = None  # (text, final) to apply
    final_received: bool = False  # no partial may follow the final text
    first_token_s: float | None = None
    last_token_s: float | None = None
    cancelled: bool = False

    def stats(self, cache_length: int) -> TurnStats:
        first = self.first_token_s or time.perf_counter()
        last = self.last_token_s or first
        decode_s = last - first
        decoded = max(len(self.reply_ids) - 1, 0)
        return TurnStats(
            num_prefilled=self.num_prefilled,
            num_reused=self.num_reused,
            num_evicted=self.num_evicted,
            num_generated=len(self.reply_ids),
            ttft_ms=(first - self.submitted_s) * 1000.0,
            decode_tokens_per_s=decoded / decode_s if decode_s > 0 else 0.0,
            cache_length=cache_length,
        )


class Session:
    """One conversation on this worker.

    Invariant: `cache.token_ids` are exactly the tokens whose keys are cached;
    `pending` tokens were produced or queued but not yet fed (the last sampled
    token, or a cut reply's closing); the next turn feeds them first.
    """

    def __init__(
        self,
        session_id: str,
        cache: SinkCache,
        config: CacheConfig,
        sampling: SamplingParams,
        system_ids: list[int],
    ):
        self.session_id = session_id
        self.cache = cache
        self.config = config
        self.sampling = sampling
        self.state = SessionState.IDLE
        # (token_id, turn): turn 0 is the system prompt.
        self.pending: list[tuple[int, int]] = [(t, 0) for t in system_ids]
        self.num_system_tokens = len(system_ids)
        self.reply_closed = True  # the last reply ended with end-of-turn
        self.num_turns = 0
        self.turn: TurnProgress | None = None
        self.last_turn: TurnProgress | None = None  # the newest finished turn
        self.queued_turn: tuple[str, int | None] | None = None  # after a barge-in
        self.next_token: int | None = None  # sampled, to feed in the next decode
        self.idle_since_s = time.monotonic()  # when the session last settled
        self.sink: EventSink | None = None
        self.generator = torch.Generator()
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)
        cache.pin_through(len(system_ids))

    def emit(self, event: Event) -> None:
        if self.sink is not None:
            self.sink(event)

    @property
    def busy(self) -> bool:
        return self.state in (
            SessionState.PREFILLING,
            SessionState.GENERATING,
            SessionState.LISTENING,
        )
