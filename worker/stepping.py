"""The engine's step loop: plan a packed step, run it, apply the results.

Mixed into `Engine`, whose state and lock it shares: a step packs the next
token of every generating session and, within a token budget, prefill chunks,
into one forward pass. Planning and applying happen under the engine lock;
the forward pass runs outside it, with the sessions it carries marked in
flight so that interruptions wait for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from worker import barge_in, duplex
from worker.detokenizer import StreamDecoder
from worker.runner import ForwardFailed
from worker.sampling import sample
from worker.session import (
    Cut,
    EndReason,
    EvictionEvent,
    InterruptedEvent,
    Session,
    SessionState,
    TokenEvent,
    TurnEndEvent,
)

log = logging.getLogger(__name__)


@dataclass
class _Item:
    session: Session
    token_ids: list[int]
    turn_ids: list[int]
    decode: bool


class Stepping:
    """Step loop of the engine (see the module docstring)."""

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._has_work():
                    self._cond.wait()
                if self._stopped:
                    return
            try:
                self.step()
            except Exception:
                log.exception("engine step failed")

    def _has_work(self) -> bool:
        working = (SessionState.PREFILLING, SessionState.GENERATING)
        return any(s.state in working for s in self.sessions.values())

    def step(self) -> int:
        """Run one packed forward pass; returns how many sessions it served."""
        started = time.perf_counter()
        with self._cond:
            items = self._plan()
            self._in_flight = {item.session.session_id for item in items}
        if not items:
            return 0  # _plan has set the generating gauge to 0
        work = [(i.session.cache, i.token_ids, i.turn_ids) for i in items]
        try:
            logits, evictions = self.runner.forward(work)
        except Exception as error:
            log.exception("forward pass failed; ending the turns it carried")
            made = error.evictions if isinstance(error, ForwardFailed) else None
            with self._cond:
                self._in_flight = set()
                for row, item in enumerate(items):
                    if item.session.turn is None:
                        continue
                    if made is not None:
                        # What was evicted before the failure is gone all the same.
                        self._report_evictions(item.session, made[row])
                    self._end_turn(item.session, EndReason.ERROR)
            return len(items)
        with self._cond:
            self._in_flight = set()
            for row, item in enumerate(items):
                try:
                    self._apply(item, logits[row], evictions[row])
                except Exception:
                    # One session's failure ends its own turn, nobody else's.
                    log.exception("session %s failed", item.session.session_id)
                    if item.session.turn is not None:
                        self._end_turn(item.session, EndReason.ERROR)
            self._update_gauges()
        self.metrics.step_duration.observe(time.perf_counter() - started)
        return len(items)

    def _plan(self) -> list[_Item]:
        items = []
        for session in list(self.sessions.values()):
            if session.state is not SessionState.GENERATING:
                continue
            if session.turn.cancelled:
                self._end_turn(session, EndReason.CANCELLED)
                continue
            if session.turn.heard_limit is not None:
                self._finish_interrupted(session)
                continue
            turn = session.turn.turn
            items.append(_Item(session, [session.next_token], [turn], decode=True))
        self.metrics.generating_sessions.set(len(items))

        budget = self.config.prefill_chunk_size
        for session_id in list(self._prefill_queue):
            if budget <= 0:
                break
            session = self.sessions.get(session_id)
            if session is None or session.state is not SessionState.PREFILLING:
                self._prefill_queue.remove(session_id)
                continue
            if session.turn.cancelled:
                self._roll_back_turn(session, EndReason.CANCELLED)
                continue
            if session.turn.draft_update is not None:
                self._apply_draft(session)
                if session.state is SessionState.LISTENING:
                    continue
            chunk = self._next_chunk(session, budget)
            budget -= len(chunk)
            ids = [t for t, _ in chunk]
            turns = [turn for _, turn in chunk]
            items.append(_Item(session, ids, turns, decode=False))
        return items

    def _apply_draft(self, session: Session) -> None:
        """Roll the turn to the newest partial text; nothing is in flight."""
        turn = session.turn
        text, final = turn.draft_update
        turn.draft_update = None
        turn.draft = not final
        target = duplex.target_tokens(self.chat, turn, text, final)
        rolled_back = duplex.revise(session, turn, target)
        self.metrics.tokens_rolled_back.inc(rolled_back)
        if final and not turn.to_prefill:
            # Every token is cached, but the reply needs fresh logits.
            session.cache.truncate(session.cache.length - 1)
            turn.to_prefill = [target[len(turn.fed_ids) - 1]]
            del turn.fed_ids[-1]
        if not turn.to_prefill:
            session.state = SessionState.LISTENING
            self._prefill_queue.remove(session.session_id)

    def _next_chunk(self, session: Session, budget: int) -> list[tuple[int, int]]:
        cache = session.cache
        room = cache.cache_size - cache.pin_target
        size = max(1, min(budget, self.config.prefill_chunk_size, room))
        chunk = session.turn.to_prefill[:size]
        del session.turn.to_prefill[:size]
        return chunk

    def _apply(self, item: _Item, logits: torch.Tensor, evictions: list) -> None:
        session = item.session
        turn = session.turn
        if session.state is SessionState.CLOSED or turn is None:
            return
        self._report_evictions(session, evictions)
        if not item.decode:
            turn.fed_ids.extend(item.token_ids)
            turn.num_prefilled += len(item.token_ids)
            self.metrics.tokens_prefilled.inc(len(item.token_ids))
            if turn.to_prefill or turn.draft_update is not None:
                return
            self._prefill_queue.remove(session.session_id)
            if turn.draft and not turn.cancelled:
                session.state = SessionState.LISTENING
                return
        else:
            turn.num_pending_reply = 0  # the fed token is cached now
        if turn.cancelled:
            self._end_turn(session, EndReason.CANCELLED)
            return
        if turn.heard_limit is not None:
            self._finish_interrupted(session)
            return
        # On the CPU: the session's generator lives there, and stays portable.
        token = sample(logits.cpu(), session.sampling, session.generator)
        self._take_token(session, token)

    def _report_evictions(self, session: Session, evictions: list) -> None:
        turn = session.turn
        for eviction in evictions:
            turn.num_evicted += eviction.num_evicted
            self.metrics.tokens_evicted.inc(eviction.num_evicted)
            self.metrics.evictions.inc()
            session.emit(EvictionEvent(turn.turn, eviction))

    def _take_token(self, session: Session, token: int) -> None:
        turn = session.turn
        now = time.perf_counter()
        if turn.first_token_s is None:
            turn.first_token_s = now
            self.metrics.ttft.observe(now - turn.submitted_s)
        else:
            self.metrics.itl.observe(now - turn.last_token_s)
        turn.last_token_s = now
        turn.reply_ids.append(token)
        turn.num_pending_reply = 1
        session.next_token = token
        self.metrics.tokens_generated.inc()
        if token in self.end_ids:
            self._end_turn(session, EndReason.STOP)
            return
        text = self._decoders[session.session_id].push(token)
        turn.delta_texts.append(text)
        index = len(turn.reply_ids) - 1
        session.emit(TokenEvent(turn.turn, index, token, text))
        if len(turn.reply_ids) >= turn.max_new_tokens:
            self._end_turn(session, EndReason.LENGTH)
        else:
            session.state = SessionState.GENERATING

    def _end_turn(self, session: Session, reason: EndReason) -> None:
        """Close the turn; the last sampled token waits to be fed next turn."""
        turn = session.turn
        if not turn.reply_ids:
            self._roll_back_turn(session, reason)
            return
        last = session.next_token
        # The last token waits to be fed, unless the step just fed it (a
        # cancel that arrived during a decode step).
        session.pending = [(last, turn.turn)] if turn.num_pending_reply else []
        session.reply_closed = last in self.end_ids
        session.state = SessionState.IDLE
        session.next_token = None
        reply = [t for t in turn.reply_ids if t not in self.end_ids]
        text = self.loaded.tokenizer.decode(reply)
        self._decoders[session.session_id] = StreamDecoder(
            self.loaded.tokenizer, self.end_ids
        )
        self._finish(session, reason, text)

    def _roll_back_turn(self, session: Session, reason: EndReason) -> None:
        """A turn that ends before its reply began leaves no trace of itself."""
        turn = session.turn
        keep = max(turn.base_length - turn.num_evicted, session.cache.num_pinned)
        session.cache.truncate(min(keep, session.cache.length))
        session.pending = turn.saved_pending
        session.num_turns = turn.turn - 1
        session.state = SessionState.IDLE
        if session.session_id in self._prefill_queue:
            self._prefill_queue.remove(session.session_id)
        self._finish(session, reason, "", rolled_back=True)

    def _finish(
        self, session: Session, reason: EndReason, text: str, rolled_back: bool = False
    ) -> None:
        turn = session.turn
        self.metrics.turns.labels(reason=reason.value).inc()
        session.emit(
            TurnEndEvent(turn.turn, reason, turn.stats(session.cache.length), text)
        )
        session.turn = None
        # Before the session settles (and is snapshotted): a turn rolled back
        # left no trace, so the newest reply is the one before it.
        session.last_turn = turn.previous if rolled_back else turn
        if session.queued_turn is not None:
            text, max_new_tokens = session.queued_turn
            session.queued_turn = None
            increment = self.chat.user_tokens(text, False, session.reply_closed)
            self._start_turn(session, increment, max_new_tokens)
        else:
            self._settled(session)

    def _settled(self, session: Session) -> None:
        session.idle_since_s = time.monotonic()
        if self.on_settled is not None:
            try:
                self.on_settled(session)
            except Exception:
                log.exception("settle hook failed for session %s", session.session_id)

    def _finish_interrupted(self, session: Session) -> None:
        """Apply a pending interruption: cut the reply, end the turn."""
        turn = session.turn
        if session.session_id in self._prefill_queue:
            self._prefill_queue.remove(session.session_id)
        cut = barge_in.cut_reply(session, turn, turn.heard_limit, self.end_ids)
        session.state = SessionState.IDLE
        session.next_token = None
        self._decoders[session.session_id] = StreamDecoder(
            self.loaded.tokenizer, self.end_ids
        )
        self._report_cut(session, cut, turn.interrupt_kind)
        turn.heard_limit = None
        self._finish(session, EndReason.INTERRUPTED, cut.text)

    def _report_cut(self, session: Session, cut: Cut, kind: str) -> None:
        self.metrics.tokens_rolled_back.inc(cut.num_rolled_back)
        self._update_gauges()
        session.emit(InterruptedEvent(cut, kind))
