"""Interruptions cut the session back to exactly what the listener heard."""

from __future__ import annotations

import pytest
import torch

from tests.worker.test_engine import run_turn
from worker.engine import Engine, EngineConfig
from worker.errors import SessionBusy
from worker.session import (
    EndReason,
    InterruptedEvent,
    SamplingParams,
    SessionState,
    TokenEvent,
)


def history(session) -> list[int]:
    """What the session will have fed once its pending tokens go in."""
    return session.cache.token_ids + [t for t, _ in session.pending]


def generate_some(engine, session, text: str, steps: int) -> list:
    events = []
    session.sink = events.append
    engine.submit_turn(session.session_id, text)
    for _ in range(steps):
        engine.step()
    return events


def finish(engine, session) -> None:
    while session.busy:
        engine.step()


def tokens(events) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


@pytest.fixture()
def engine(tiny):
    loaded, reference = tiny
    engine = Engine(loaded, EngineConfig(prefill_chunk_size=64))
    engine.reference = reference
    return engine


def open_with_turn(engine):
    session = engine.open_session(None, SamplingParams(max_new_tokens=40))
    run_turn(engine, session, "First question")
    return session


def test_interrupt_keeps_exactly_the_heard_tokens(engine):
    session = open_with_turn(engine)
    before = history(session)
    increment = engine.chat.user_tokens("Second", False, session.reply_closed)
    events = generate_some(engine, session, "Second", steps=12)
    sent = tokens(events)
    engine.interrupt(session.session_id, heard_tokens=5)
    finish(engine, session)
    cut = next(e.cut for e in events if isinstance(e, InterruptedEvent))
    assert cut.num_kept == 5
    assert cut.num_rolled_back == len(sent) - 5
    assert events[-1].reason is EndReason.INTERRUPTED
    assert history(session) == before + increment + sent[:5]
    assert session.pending == [] and not session.reply_closed


def test_next_token_after_a_rollback_is_a_cold_start(engine):
    session = open_with_turn(engine)
    generate_some(engine, session, "Second", steps=10)
    engine.interrupt(session.session_id, heard_tokens=3)
    finish(engine, session)
    increment = engine.chat.user_tokens("Third", False, session.reply_closed)
    context = history(session) + increment
    events = run_turn(engine, session, "Third")
    expected = engine.reference.generate(
        torch.tensor([context]),
        attention_mask=torch.ones(1, len(context), dtype=torch.long),
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=engine.chat.end_of_turn_ids,
        pad_token_id=0,
    )[0, len(context) :].tolist()
    assert tokens(events)[:5] == [t for t in expected if t not in engine.end_ids][:5]


def test_heard_nothing_commits_an_empty_reply(engine):
    session = open_with_turn(engine)
    before = history(session)
    increment = engine.chat.user_tokens("Second", False, session.reply_closed)
    events = generate_some(engine, session, "Second", steps=6)
    engine.interrupt(session.session_id, heard_tokens=0)
    finish(engine, session)
    assert events[-1].text == ""
    assert history(session) == before + increment
    # The next turn closes the empty reply with the end-of-turn marker.
    nxt = engine.chat.user_tokens("Third", False, session.reply_closed)
    assert nxt[0] == engine.chat.end_of_turn_ids[0]


def test_interrupt_during_prefill_commits_an_empty_reply(engine):
    session = open_with_turn(engine)
    events = []
    session.sink = events.append
    engine.submit_turn(session.session_id, "word " * 200)
    engine.step()
    assert session.turn.to_prefill, "still prefilling"
    engine.interrupt(session.session_id, heard_tokens=0)
    finish(engine, session)
    assert tokens(events) == []
    assert events[-1].reason is EndReason.INTERRUPTED
    assert session.num_turns == 2


def test_heard_more_than_generated_is_clamped(engine):
    session = open_with_turn(engine)
    before = history(session)
    increment = engine.chat.user_tokens("Second", False, session.reply_closed)
    events = generate_some(engine, session, "Second", steps=5)
    engine.interrupt(session.session_id, heard_tokens=1000)
    finish(engine, session)
    cut = next(e.cut for e in events if isinstance(e, InterruptedEvent))
    sent = tokens(events)
    assert cut.clamped and cut.num_kept == len(sent) and cut.num_rolled_back == 0
    assert history(session) == before + increment + sent


def test_interrupting_a_finished_reply_truncates_it(engine):
    session = open_with_turn(engine)
    before_reply = session.last_turn.base_length + session.last_turn.num_prefilled
    reply = list(session.last_turn.reply_ids)
    events = []
    session.sink = events.append
    engine.interrupt(session.session_id, heard_tokens=4)
    (event,) = events
    assert event.cut.num_kept == 4
    assert history(session)[before_reply:] == reply[:4]
    # A second interruption further back cuts again; one past the end does nothing.
    engine.interrupt(session.session_id, heard_tokens=2)
    assert history(session)[before_reply:] == reply[:2]
    engine.interrupt(session.session_id, heard_tokens=3)
    assert events[-1].cut.clamped and events[-1].cut.num_rolled_back == 0
    assert history(session)[before_reply:] == reply[:2]


def test_interrupt_then_next_turn_at_once_follows_the_cut(engine):
    session = open_with_turn(engine)
    before = history(session)
    increment = engine.chat.user_tokens("Second", False, session.reply_closed)
    events = generate_some(engine, session, "Second", steps=8)
    sent = tokens(events)
    engine.interrupt(session.session_id, heard_tokens=2)
    engine.submit_turn(session.session_id, "Third")  # no step in between
    finish(engine, session)
    third = engine.chat.user_tokens("Third", False, reply_closed=False)
    reply = tokens(events)[len(sent) :]
    assert history(session)[: len(before) + len(increment) + 2 + len(third)] == (
        before + increment + sent[:2] + third
    )
    assert session.num_turns == 3 and reply


def test_heard_chars_and_acks(engine):
    session = open_with_turn(engine)
    events = generate_some(engine, session, "Second", steps=10)
    texts = [e.text for e in events if isinstance(e, TokenEvent)]
    # The first cut point at or after 3 tokens that ends on whole text.
    heard = next(n for n in range(3, len(texts)) if texts[n - 1])
    chars = len("".join(texts[:heard]))
    engine.acknowledge(session.session_id, heard + 3)
    engine.interrupt(session.session_id, heard_chars=chars)
    finish(engine, session)
    assert session.last_turn.reply_ids == tokens(events)[:heard]
    engine.interrupt(session.session_id)  # the last ack is past the cut: no-op
    cut = [e.cut for e in events if isinstance(e, InterruptedEvent)][-1]
    assert cut.num_rolled_back == 0


def test_reply_longer_than_the_window_reports_what_was_lost(tiny):
    loaded, _ = tiny
    config = EngineConfig(sink_size=4, window_size=40, evict_size=8)
    engine = Engine(loaded, config)
    session = engine.open_session("S", SamplingParams(max_new_tokens=200))
    events = generate_some(engine, session, "Go", steps=80)
    sent = tokens(events)
    engine.interrupt(session.session_id, heard_tokens=len(sent) - 10)
    finish(engine, session)
    cut = next(e.cut for e in events if isinstance(e, InterruptedEvent))
    assert cut.num_lost > 0
    kept_in_cache = cut.num_kept - cut.num_lost
    assert session.cache.token_ids[-kept_in_cache:] == sent[cut.num_lost : cut.num_kept]


def test_a_cancel_during_a_decode_step_feeds_no_token_twice(engine):
    """The token fed by the step that was running when the cancel came is
    cached already; it must not wait to be fed again."""
    session = open_with_turn(engine)
    events = generate_some(engine, session, "Second", steps=6)
    assert session.state is SessionState.GENERATING and tokens(events)
    forward = engine.runner.forward

    def cancelled_during(work):
        engine.cancel_turn(session.session_id)
        return forward(work)

    engine.runner.forward = cancelled_during
    engine.step()
    engine.runner.forward = forward
    reply = session.last_turn.reply_ids
    assert not session.busy and session.pending == []
    assert session.cache.token_ids[-len(reply) :] == reply


def test_nothing_to_interrupt(engine):
    session = engine.open_session(None, SamplingParams())
    with pytest.raises(SessionBusy):
        engine.interrupt(session.session_id, heard_tokens=1)
