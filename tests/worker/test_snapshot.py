"""Session snapshots: exact round trips, same continuations, refusals."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import struct

import pytest
import torch

from tests.worker.test_engine import run_turn
from worker.detokenizer import StreamDecoder
from worker.engine import Engine, EngineConfig
from worker.errors import SessionBusy
from worker.model import prepare_model
from worker.session import (
    EndReason,
    SamplingParams,
    Session,
    TokenEvent,
    TurnEndEvent,
)
from worker.snapshot import (
    _PREFIX,
    _SAMPLING_TYPES,
    SnapshotError,
    decode_snapshot,
    encode_snapshot,
)

CONFIG = EngineConfig(sink_size=4, window_size=40, evict_size=8, max_new_tokens=8)
# The first turn alone overflows the 44-slot cache: the snapshot is taken
# after evictions, with keys that moved and were rotated again.
QUESTIONS = [" ".join(f"word{i}" for i in range(12)), "Tell me more"]


def adopt(engine: Engine, session: Session) -> None:
    """Stand-in for an `Engine.adopt_session` hook: what open_session does."""
    with engine._cond:
        engine.sessions[session.session_id] = session
        engine._decoders[session.session_id] = StreamDecoder(
            engine.loaded.tokenizer, engine.end_ids
        )


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that equality is bit-exact in any dtype."""
    return t.contiguous().view(torch.uint8)


def assert_same_session(a: Session, b: Session) -> None:
    ca, cb = a.cache, b.cache
    assert cb.length == ca.length
    assert cb.token_ids == ca.token_ids
    assert cb.turn_ids == ca.turn_ids
    assert cb.pin_target == ca.pin_target and cb.num_pinned == ca.num_pinned
    assert (cb.sink_size, cb.window_size, cb.evict_size, cb.capacity) == (
        ca.sink_size,
        ca.window_size,
        ca.evict_size,
        ca.capacity,
    )
    assert torch.equal(bits(cb.raw_keys()), bits(ca.raw_keys()))
    assert torch.equal(bits(cb.v[:, :, : cb.length]), bits(ca.v[:, :, : ca.length]))
    assert torch.equal(bits(cb.rotated_keys()), bits(ca.rotated_keys()))
    assert b.session_id == a.session_id
    assert b.pending == a.pending
    assert b.num_system_tokens == a.num_system_tokens
    assert b.reply_closed == a.reply_closed
    assert b.num_turns == a.num_turns
    assert b.sampling == a.sampling and b.config == a.config
    assert torch.equal(b.generator.get_state(), a.generator.get_state())


def reply(engine: Engine, session: Session, text: str) -> tuple[list[int], str]:
    events = run_turn(engine, session, text)
    assert isinstance(events[-1], TurnEndEvent)
    return [e.token_id for e in events if isinstance(e, TokenEvent)], events[-1].text


def converse(loaded, dtype: torch.dtype, sampling: SamplingParams):
    """An engine and a session that had two turns, with evictions."""
    engine = Engine(loaded, CONFIG)
    session = engine.open_session("Be brief.", sampling)
    fed = 0
    for question in QUESTIONS:
        fed += run_turn(engine, session, question)[-1].stats.num_prefilled
    assert fed > session.cache.cache_size, "the conversation must have evicted"
    return engine, session


@pytest.mark.parametrize(
    ("dtype", "sampling"),
    [
        (torch.float32, SamplingParams(max_new_tokens=4)),
        (torch.bfloat16, SamplingParams(max_new_tokens=4)),
        # Sampled: the continuation also depends on the generator state.
        (torch.float32, SamplingParams(temperature=1.5, max_new_tokens=4, seed=7)),
    ],
    ids=["fp32-greedy", "bf16-greedy", "fp32-sampled"],
)
def test_round_trip_is_exact_and_continues_the_same(tiny, dtype, sampling):
    _, reference = tiny
    # A model is cast before it is prepared: its packed weights keep their dtype.
    served = copy.deepcopy(reference).to(dtype)
    loaded = prepare_model(served, tiny[0].tokenizer, max_positions=4096)
    engine, session = converse(loaded, dtype, sampling)
    blob = encode_snapshot(session, loaded.fingerprint)
    other = Engine(loaded, CONFIG)
    vocab = loaded.config.vocab_size
    restored = decode_snapshot(
        blob, loaded.fingerprint, other.cache_shape, loaded.rotary, vocab
    )
    assert restored.cache.k_raw.dtype == dtype
    assert_same_session(session, restored)

    adopt(other, restored)
    assert reply(other, restored, "Go on") == reply(engine, session, "Go on")
    assert_same_session(session, restored)


def moved(loaded, engine: Engine, session: Session) -> tuple[Engine, Session]:
    """The session snapshotted and restored on a second engine like the first."""
    blob = encode_snapshot(session, loaded.fingerprint)
    other = Engine(loaded, CONFIG)
    other.end_ids = engine.end_ids
    vocab = len(loaded.tokenizer)
    restored = decode_snapshot(
        blob, loaded.fingerprint, other.cache_shape, loaded.rotary, vocab
    )
    adopt(other, restored)
    return other, restored


def test_a_restored_session_cuts_its_last_reply_like_the_original(tiny):
    """A late interruption after a move: the snapshot carries the newest
    reply, so the restored session cuts it to the heard point exactly as
    the session that never moved, and both go on alike."""
    loaded, _ = tiny
    engine, session = converse(loaded, torch.float32, SamplingParams(max_new_tokens=6))
    engine.acknowledge(session.session_id, 2)
    other, restored = moved(loaded, engine, session)
    assert restored.last_turn.reply_ids == session.last_turn.reply_ids
    assert restored.last_turn.delta_texts == session.last_turn.delta_texts
    cuts = []
    for eng, sess in ((engine, session), (other, restored)):
        events = []
        sess.sink = events.append
        eng.interrupt(sess.session_id, heard_tokens=3)
        eng.interrupt(sess.session_id)  # back to the acknowledged 2 tokens
        cuts.append([e.cut for e in events])
    assert cuts[0] == cuts[1] and cuts[0][-1].num_kept == 2
    assert_same_session(session, restored)
    assert reply(other, restored, "Go on") == reply(engine, session, "Go on")


def test_a_reply_that_ended_with_end_of_turn_restores(tiny):
    """The end-of-turn marker has no text of its own; such a reply (nearly
    every reply of a real model) must still make a restorable snapshot."""
    loaded, _ = tiny
    probe = Engine(loaded, CONFIG)
    greedy, _ = reply(probe, probe.open_session(None, SamplingParams()), "Hello")
    engine = Engine(loaded, CONFIG)
    engine.end_ids = engine.end_ids | {greedy[2]}  # the tiny model's third token
    session = engine.open_session(None, SamplingParams())
    events = run_turn(engine, session, "Hello")
    assert events[-1].reason is EndReason.STOP
    assert len(session.last_turn.delta_texts) == len(session.last_turn.reply_ids) - 1
    other, restored = moved(loaded, engine, session)
    assert restored.last_turn.reply_ids == session.last_turn.reply_ids
    assert reply(other, restored, "Go on") == reply(engine, session, "Go on")


def test_a_turn_rolled_back_is_not_the_snapshot_s_last_reply(tiny):
    """Snapshots are taken as a session settles, including after a turn that
    ended before its reply began: that one must not be taken for the newest
    reply (its number is past the session's turns)."""
    loaded, _ = tiny
    engine, session = converse(loaded, torch.float32, SamplingParams(max_new_tokens=4))
    answered = session.last_turn
    blobs = []
    engine.on_settled = lambda s: blobs.append(encode_snapshot(s, loaded.fingerprint))
    engine.submit_turn(session.session_id, "A question nobody waits for")
    engine.cancel_turn(session.session_id)
    while session.busy:
        engine.step()
    assert session.num_turns == 2 and session.last_turn is answered
    restored = decode_snapshot(
        blobs[-1], loaded.fingerprint, engine.cache_shape, loaded.rotary
    )
    assert restored.last_turn.turn == answered.turn
    assert restored.last_turn.reply_ids == answered.reply_ids


def test_a_snapshot_without_the_last_reply_still_restores(snapshot):
    """Snapshots written before the reply was kept restore without it: the
    reply just cannot be cut any more."""
    blob, loaded, engine = snapshot
    session = decode_snapshot(
        rewrite(blob, last_reply=None),
        loaded.fingerprint,
        engine.cache_shape,
        loaded.rotary,
    )
    assert session.last_turn is None
    adopt(engine, session)
    with pytest.raises(SessionBusy, match="no reply to interrupt"):
        engine.interrupt(session.session_id, heard_tokens=1)


def test_session_with_no_tokens_yet(tiny):
    loaded, _ = tiny
    engine = Engine(loaded, CONFIG)
    session = engine.open_session(None, SamplingParams(max_new_tokens=5))
    blob = encode_snapshot(session, loaded.fingerprint)
    restored = decode_snapshot(
        blob, loaded.fingerprint, engine.cache_shape, loaded.rotary
    )
    assert restored.cache.length == 0 and restored.pending == session.pending
    assert_same_session(session, restored)
    other = Engine(loaded, CONFIG)
    adopt(other, restored)
    assert reply(other, restored, "Hi") == reply(engine, session, "Hi")


def test_a_busy_session_is_refused(tiny):
    loaded, _ = tiny
    engine = Engine(loaded, CONFIG)
    session = engine.open_session(None, SamplingParams(max_new_tokens=5))
    engine.submit_turn(session.session_id, "Hello")
    with pytest.raises(SnapshotError, match="prefilling; only an idle session"):
        encode_snapshot(session, loaded.fingerprint)


@pytest.fixture()
def snapshot(tiny):
    """(blob, loaded, engine) of a session that had one turn."""
    loaded, _ = tiny
    engine = Engine(loaded, CONFIG)
    session = engine.open_session(None, SamplingParams(max_new_tokens=5))
    run_turn(engine, session, "Hello there")
    return encode_snapshot(session, loaded.fingerprint), loaded, engine


def split(blob: bytes) -> tuple[dict, bytes]:
    _, size, _ = _PREFIX.unpack_from(blob)
    return json.loads(blob[_PREFIX.size : _PREFIX.size + size]), blob[
        _PREFIX.size + size :
    ]


def rewrite(blob: bytes, **changes: object) -> bytes:
    """The same snapshot with header fields changed, its header checksum redone."""
    header, tensors = split(blob)
    text = json.dumps({**header, **changes}).encode()
    magic = blob[:8]
    return struct.pack("<8sI32s", magic, len(text), hashlib.sha256(text).digest()) + (
        text + tensors
    )


def test_rewrite_without_changes_is_accepted(snapshot):
    blob, loaded, engine = snapshot
    decode_snapshot(
        rewrite(blob), loaded.fingerprint, engine.cache_shape, loaded.rotary
    )


def corruptions(blob: bytes, shape) -> list[tuple[str, bytes, object, str]]:
    header, _ = split(blob)
    n = header["length"]
    ids, turns = header["token_ids"][:-1], header["turn_ids"][:-1]
    flipped = bytearray(blob)
    flipped[-3] ^= 0x10
    in_header = bytearray(blob)
    in_header[_PREFIX.size + 20] ^= 0x01
    other = dataclasses.replace
    last = header["last_reply"]
    wrong_ids = [i + 1 for i in last["reply_ids"]]
    return [
        ("truncated", blob[:-1], shape, "truncated snapshot"),
        ("truncated header", blob[: _PREFIX.size + 5], shape, "header cut"),
        ("too short", blob[:10], shape, "truncated snapshot"),
        ("trailing", blob + b"\0", shape, "trailing bytes"),
        ("tensor byte", bytes(flipped), shape, "tensor checksum mismatch"),
        ("header byte", bytes(in_header), shape, "header checksum mismatch"),
        ("magic", b"NOTSNAP!" + blob[8:], shape, "not a sinkserve snapshot"),
        ("version", rewrite(blob, version=2), shape, "unsupported snapshot format"),
        ("format", rewrite(blob, format="x"), shape, "unsupported snapshot format"),
        ("heads", blob, other(shape, num_kv_heads=4), "cache shape"),
        ("head dim", blob, other(shape, head_dim=8), "cache shape"),
        ("layers", blob, other(shape, num_layers=3), "cache shape"),
        ("dtype", blob, other(shape, dtype=torch.bfloat16), "dtype"),
        ("header shape", rewrite(blob, shape=[2, 2, 8]), shape, "cache shape"),
        ("ids", rewrite(blob, token_ids=header["token_ids"][1:]), shape, "lengths"),
        ("turns", rewrite(blob, turn_ids=[0] * (n + 1)), shape, "inconsistent"),
        (
            "length",
            rewrite(blob, length=n - 1, token_ids=ids, turn_ids=turns, last_reply=None),
            shape,
            "tensor bytes",
        ),
        ("over capacity", rewrite(blob, length=45), shape, r"length .*\[0, 44\]"),
        ("pin", rewrite(blob, pin_target=100), shape, "pin_target"),
        ("turn > turns", rewrite(blob, num_turns=0), shape, "turn_ids"),
        ("pending", rewrite(blob, pending=[[1]]), shape, "pending"),
        ("sampling", rewrite(blob, sampling={"top_k": 1}), shape, "sampling"),
        (
            "seed",
            rewrite(blob, sampling={**header["sampling"], "seed": "7"}),
            shape,
            "seed",
        ),
        ("generator", rewrite(blob, generator_state="AAAA"), shape, "generator"),
        ("session id", rewrite(blob, session_id=""), shape, "session_id"),
        ("tensor sum", rewrite(blob, tensor_sha256="0" * 64), shape, "checksum"),
        ("reply keys", rewrite(blob, last_reply={"turn": 1}), shape, "last_reply"),
        ("reply turn", rewrite(blob, last_reply={**last, "turn": 2}), shape, "turn"),
        (
            "reply texts",
            rewrite(blob, last_reply={**last, "delta_texts": []}),
            shape,
            "one string per reply token",
        ),
        (
            "reply tokens",
            rewrite(blob, last_reply={**last, "reply_ids": wrong_ids}),
            shape,
            "does not match the end of the cache",
        ),
    ]


def test_each_corruption_is_refused_with_a_clear_error(snapshot):
    blob, loaded, engine = snapshot
    for name, bad, shape, message in corruptions(blob, engine.cache_shape):
        try:
            decode_snapshot(bad, loaded.fingerprint, shape, loaded.rotary)
        except SnapshotError as e:
            assert re.search(message, str(e)), f"{name}: {e}"
        else:
            pytest.fail(f"{name}: accepted")


def test_foreign_model_is_refused(snapshot):
    blob, loaded, engine = snapshot
    message = f"snapshot of model '{loaded.fingerprint}', not '0123456789abcdef'"
    with pytest.raises(SnapshotError, match=message):
        decode_snapshot(blob, "0123456789abcdef", engine.cache_shape, loaded.rotary)


def test_token_ids_outside_the_vocabulary_are_refused(snapshot):
    blob, loaded, engine = snapshot
    vocab = loaded.config.vocab_size
    header, _ = split(blob)
    args = (loaded.fingerprint, engine.cache_shape, loaded.rotary, vocab)
    ids = [*header["token_ids"][:-1], vocab]
    with pytest.raises(SnapshotError, match=rf"token_ids .*\[0, {vocab - 1}\]"):
        decode_snapshot(rewrite(blob, token_ids=ids), *args)
    pending = [[vocab + 5, header["num_turns"]]]
    with pytest.raises(SnapshotError, match="pending token ids"):
        decode_snapshot(rewrite(blob, pending=pending), *args)


def test_no_single_byte_change_or_cut_is_accepted(snapshot):
    blob, loaded, engine = snapshot
    for i in range(0, len(blob), 37):
        changed = bytearray(blob)
        changed[i] ^= 0xFF
        for bad in (bytes(changed), blob[:i]):
            with pytest.raises(SnapshotError):
                decode_snapshot(
                    bad, loaded.fingerprint, engine.cache_shape, loaded.rotary
                )


def test_sampling_fields_are_all_stored():
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(_SAMPLING_TYPES) == names
