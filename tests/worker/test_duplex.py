"""Partial user input is prefilled while spoken; revisions roll back."""

from __future__ import annotations

import pytest

from tests.worker.test_barge_in import history
from tests.worker.test_engine import run_turn
from worker.engine import Engine, EngineConfig
from worker.errors import SessionBusy
from worker.session import SamplingParams, SessionState, TokenEvent


@pytest.fixture()
def engine(tiny):
    loaded, _ = tiny
    return Engine(loaded, EngineConfig(prefill_chunk_size=64))


def settle(engine, session) -> None:
    while session.state in (SessionState.PREFILLING, SessionState.GENERATING):
        engine.step()


def test_streamed_turn_equals_the_same_turn_sent_whole(tiny):
    loaded, _ = tiny
    streamed = Engine(loaded, EngineConfig())
    whole = Engine(loaded, EngineConfig())
    a = streamed.open_session(None, SamplingParams(max_new_tokens=8))
    b = whole.open_session(None, SamplingParams(max_new_tokens=8))
    run_turn(streamed, a, "Hello")
    run_turn(whole, b, "Hello")

    events = []
    a.sink = events.append
    for partial in [
        "What is",
        "What is the cap",
        "What was the capital of",
        "What is the",
    ]:
        streamed.partial_turn(a.session_id, partial, final=False)
        settle(streamed, a)
        assert a.state is SessionState.LISTENING
    streamed.partial_turn(a.session_id, "What is the capital of France?", final=True)
    settle(streamed, a)
    expected = run_turn(whole, b, "What is the capital of France?")
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    assert tokens == [e.token_id for e in expected if isinstance(e, TokenEvent)]
    assert history(a) == history(b)


def test_eager_prefill_leaves_little_for_the_final_text(engine):
    session = engine.open_session(None, SamplingParams(max_new_tokens=4))
    run_turn(engine, session, "Hi")
    text = " ".join(f"word{i}" for i in range(60))
    engine.partial_turn(session.session_id, text, final=False)
    settle(engine, session)
    fed_before = session.turn.num_prefilled
    events = []
    session.sink = events.append
    engine.partial_turn(session.session_id, text, final=True)
    settle(engine, session)
    end = events[-1]
    assert end.stats.num_prefilled - fed_before <= 8  # the holdback and the closing


def test_revision_rolls_back_to_the_shared_prefix(engine):
    session = engine.open_session(None, SamplingParams(max_new_tokens=4))
    run_turn(engine, session, "Hi")
    base = history(session)
    closed = session.reply_closed
    first_text, second_text = (
        "I want to book a flight to Boston",
        "I want to cook a fish",
    )
    engine.partial_turn(session.session_id, first_text, final=False)
    settle(engine, session)
    first = engine.chat.user_tokens_open(first_text, False, closed)[:-2]
    assert session.cache.token_ids == base + first

    engine.partial_turn(session.session_id, second_text, final=False)
    settle(engine, session)
    second = engine.chat.user_tokens_open(second_text, False, closed)[:-2]
    assert session.cache.token_ids == base + second
    shared = next(
        i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y
    )
    pending = len(session.turn.saved_pending)  # the last reply token, fed first
    # Only the difference was fed again.
    assert session.turn.num_prefilled == pending + len(first) + len(second) - shared
    assert engine.metrics.tokens_rolled_back._value.get() == len(first) - shared


def test_full_turn_during_a_stream_is_its_final_text(engine):
    session = engine.open_session(None, SamplingParams(max_new_tokens=3))
    engine.partial_turn(session.session_id, "Tell me", final=False)
    settle(engine, session)
    engine.submit_turn(session.session_id, "Tell me a joke")
    settle(engine, session)
    assert session.num_turns == 1 and session.state is SessionState.IDLE


def test_cancel_while_listening_leaves_no_trace(engine):
    session = engine.open_session(None, SamplingParams(max_new_tokens=3))
    run_turn(engine, session, "Hi")
    before = history(session)
    engine.partial_turn(
        session.session_id, "Something long enough to prefill", final=False
    )
    settle(engine, session)
    engine.cancel_turn(session.session_id)
    assert history(session) == before and session.num_turns == 1


def test_cancel_while_a_partial_is_prefilled_leaves_no_trace(engine):
    """Cancelled while the forward pass that prefills it runs (the client
    went away), the streamed turn must not settle into waiting for text
    that will never come."""
    session = engine.open_session(None, SamplingParams(max_new_tokens=3))
    run_turn(engine, session, "Hi")
    before = history(session)
    engine.partial_turn(
        session.session_id, "Something long enough to prefill", final=False
    )
    forward = engine.runner.forward

    def cancelled_during(work):
        engine.cancel_turn(session.session_id)
        return forward(work)

    engine.runner.forward = cancelled_during
    settle(engine, session)
    assert session.state is SessionState.IDLE
    assert history(session) == before and session.num_turns == 1


def test_no_streaming_while_a_reply_is_generated(engine):
    session = engine.open_session(None, SamplingParams(max_new_tokens=30))
    engine.submit_turn(session.session_id, "Hi")
    engine.step()
    engine.step()
    with pytest.raises(SessionBusy):
        engine.partial_turn(session.session_id, "Wait", final=False)


def test_the_reply_to_a_streamed_turn_can_be_interrupted(engine):
    session = engine.open_session(None, SamplingParams(max_new_tokens=30))
    engine.partial_turn(session.session_id, "Tell me", final=False)
    settle(engine, session)
    with pytest.raises(SessionBusy):  # nothing to cut while the user speaks
        engine.interrupt(session.session_id, heard_tokens=0)
    engine.partial_turn(session.session_id, "Tell me a story", final=True)
    for _ in range(6):
        engine.step()
    engine.interrupt(session.session_id, heard_tokens=2)
    settle(engine, session)
    assert len(session.last_turn.reply_ids) == 2
