"""The engine against `transformers` generate, and its refusals."""

from __future__ import annotations

import pytest
import torch

from worker.engine import Engine, EngineConfig
from worker.errors import InvalidRequest, LimitExceeded, SessionBusy, SessionNotFound
from worker.session import EndReason, SamplingParams, TokenEvent, TurnEndEvent

QUESTIONS = ["Hello there", "Tell me more about it", "And a third question?"]


def run_turn(engine: Engine, session, text: str, **kwargs) -> list:
    events = []
    session.sink = events.append
    engine.submit_turn(session.session_id, text, **kwargs)
    while session.busy:
        engine.step()
    return events


def reference_replies(
    engine: Engine, reference, questions, max_new_tokens, system=None
):
    """Greedy `generate` on the whole conversation, turn after turn."""
    chat = engine.chat
    context = chat.system_tokens(system)
    replies = []
    closed = True
    for i, question in enumerate(questions):
        context += chat.user_tokens(question, first=i == 0, reply_closed=closed)
        output = reference.generate(
            torch.tensor([context], device=reference.device),
            attention_mask=torch.ones(
                1, len(context), dtype=torch.long, device=reference.device
            ),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=chat.end_of_turn_ids,
            pad_token_id=chat.end_of_turn_ids[0],
        )[0, len(context) :].tolist()
        replies.append(output)
        context += output
        closed = output[-1] in chat.end_of_turn_ids
    return replies


def assert_greedy_matches_generate(
    engine: Engine, session, reference, max_new_tokens: int
) -> list[list]:
    """Each turn of QUESTIONS replies as `generate` does on the whole
    conversation; returns each turn's events."""
    expected = reference_replies(engine, reference, QUESTIONS, max_new_tokens)
    turns = []
    for question, want in zip(QUESTIONS, expected, strict=True):
        events = run_turn(engine, session, question)
        got = [e.token_id for e in events if isinstance(e, TokenEvent)]
        assert got == [t for t in want if t not in engine.end_ids]
        turns.append(events)
    return turns


def test_greedy_matches_generate_over_three_turns(tiny):
    loaded, reference = tiny
    engine = Engine(loaded, EngineConfig(window_size=1020, prefill_chunk_size=7))
    session = engine.open_session(None, SamplingParams(max_new_tokens=12))
    for events in assert_greedy_matches_generate(engine, session, reference, 12):
        end = events[-1]
        assert isinstance(end, TurnEndEvent)
        assert end.stats.num_evicted == 0
    # Without eviction the cache holds the whole conversation.
    assert session.cache.length == len(session.cache.token_ids)


def test_turn_stats_count_reuse(tiny):
    loaded, _ = tiny
    engine = Engine(loaded)
    session = engine.open_session("Be brief.", SamplingParams(max_new_tokens=5))
    first = run_turn(engine, session, "One")[-1]
    second = run_turn(engine, session, "Two")[-1]
    assert first.stats.num_reused == 0
    assert first.stats.num_prefilled == session.num_system_tokens + len(
        engine.chat.user_tokens("One", True, True)
    )
    assert second.stats.num_reused == first.stats.cache_length
    increment = engine.chat.user_tokens("Two", False, False)
    assert second.stats.num_prefilled == 1 + len(increment)  # + the pending token
    assert first.reason is EndReason.LENGTH


def test_long_turn_is_prefilled_in_chunks_with_evictions(tiny):
    loaded, _ = tiny
    config = EngineConfig(
        sink_size=4, window_size=60, evict_size=8, prefill_chunk_size=16
    )
    engine = Engine(loaded, config)
    session = engine.open_session("Sys.", SamplingParams(max_new_tokens=20))
    long_text = " ".join(f"word{i}" for i in range(150))
    events = run_turn(engine, session, long_text)
    evictions = [e for e in events if not isinstance(e, TokenEvent | TurnEndEvent)]
    assert evictions, "a turn longer than the window must evict"
    assert session.cache.length <= 64
    pinned = session.cache.num_pinned
    assert (
        session.cache.token_ids[:pinned] == engine.chat.system_tokens("Sys.")[:pinned]
    )
    assert events[-1].stats.num_evicted == sum(
        e.eviction.num_evicted for e in evictions
    )


def snapshot(session) -> tuple:
    cache = session.cache
    return (
        list(cache.token_ids),
        list(cache.turn_ids),
        list(session.pending),
        session.num_turns,
        session.state,
        cache.k_raw[:, :, : cache.length].clone(),
    )


def assert_same(before: tuple, after: tuple) -> None:
    assert before[:5] == after[:5]
    torch.testing.assert_close(before[5], after[5])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"text": "   "}, InvalidRequest),
        ({"text": "word " * 400}, LimitExceeded),
        ({"text": "hi", "max_new_tokens": 0}, InvalidRequest),
    ],
)
def test_bad_turns_leave_the_session_unchanged(tiny, kwargs, error):
    loaded, _ = tiny
    engine = Engine(loaded, EngineConfig(max_turn_tokens=100))
    session = engine.open_session(None, SamplingParams(max_new_tokens=4))
    run_turn(engine, session, "First")
    before = snapshot(session)
    with pytest.raises(error):
        engine.submit_turn(session.session_id, **kwargs)
    assert_same(before, snapshot(session))


def test_second_turn_while_generating_is_refused(tiny):
    loaded, _ = tiny
    engine = Engine(loaded)
    session = engine.open_session(None, SamplingParams(max_new_tokens=30))
    engine.submit_turn(session.session_id, "First")
    engine.step()
    engine.step()
    with pytest.raises(SessionBusy):
        engine.submit_turn(session.session_id, "Second")
    assert session.num_turns == 1
    events = []
    session.sink = events.append
    while session.busy:
        engine.step()
    assert events[-1].turn == 1
    assert session.num_turns == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"sampling": SamplingParams(temperature=-1.0)}, InvalidRequest),
        ({"sampling": SamplingParams(top_p=1.5)}, InvalidRequest),
        ({"sampling": SamplingParams(max_new_tokens=10**6)}, InvalidRequest),
        ({"sampling": SamplingParams(), "window_size": 10**6}, LimitExceeded),
        ({"sampling": SamplingParams(), "sink_size": 1000}, LimitExceeded),
        ({"sampling": SamplingParams(), "window_size": 0}, InvalidRequest),
    ],
)
def test_bad_sessions_are_refused(tiny, kwargs, error):
    loaded, _ = tiny
    engine = Engine(loaded)
    with pytest.raises(error):
        engine.open_session(None, **kwargs)
    assert engine.sessions == {}


def test_unknown_session(tiny):
    loaded, _ = tiny
    engine = Engine(loaded)
    with pytest.raises(SessionNotFound):
        engine.submit_turn("nope", "hi")


def test_cancel_during_prefill_leaves_no_trace(tiny):
    loaded, _ = tiny
    engine = Engine(loaded, EngineConfig(prefill_chunk_size=4))
    session = engine.open_session(None, SamplingParams(max_new_tokens=3))
    run_turn(engine, session, "First")
    before = snapshot(session)
    events = []
    session.sink = events.append
    engine.submit_turn(session.session_id, "a long enough second turn to need chunks")
    engine.step()
    engine.cancel_turn(session.session_id)
    while session.busy:
        engine.step()
    assert events[-1].reason is EndReason.CANCELLED
    assert_same(before, snapshot(session))


def test_a_failed_forward_reports_its_evictions_and_rolls_the_turn_back(
    tiny, monkeypatch
):
    loaded, _ = tiny
    config = EngineConfig(sink_size=4, window_size=40, evict_size=8)
    engine = Engine(loaded, config)
    session = engine.open_session(None, SamplingParams(max_new_tokens=6))
    run_turn(engine, session, " ".join(f"w{i}" for i in range(14)))
    before = list(session.cache.token_ids)
    pinned = session.cache.num_pinned
    assert session.cache.length > 30, "the next turn must make the cache evict"

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    with monkeypatch.context() as patch:
        patch.setattr(engine.runner, "_run_model", broken)
        events = run_turn(engine, session, "a question long enough to need room")

    evicted = [e.eviction.num_evicted for e in events if hasattr(e, "eviction")]
    assert evicted and sum(evicted) > 0, "the eviction made before the failure"
    assert events[-1].reason is EndReason.ERROR
    assert events[-1].stats.num_evicted == sum(evicted)
    # The turn leaves nothing; only the evicted tokens are gone, from the front.
    gone = sum(evicted)
    assert session.cache.token_ids == before[:pinned] + before[pinned + gone :]
    assert engine.metrics.tokens_evicted._value.get() >= gone
    replies = run_turn(engine, session, "and now it works")
    assert replies[-1].reason in (EndReason.STOP, EndReason.LENGTH)
