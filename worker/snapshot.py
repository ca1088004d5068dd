"""Snapshots of idle sessions: bytes that rebuild the session elsewhere.

Layout of a snapshot (all integers little-endian):

    MAGIC (8 bytes) | header length (u32) | SHA-256 of the header (32 bytes)
    | header (UTF-8 JSON) | k_raw bytes | v bytes

The header carries the format and version, the model fingerprint, dtype and
cache geometry, the session's token bookkeeping, sampling parameters, the
generator state (base64) and the SHA-256 of the tensor bytes. The tensors are
the unrotated keys and the values of slots [0, length), each [L, KVH, length,
D] in the cache dtype, raw. The rotated keys are not stored: restoring
rotates `k_raw` again, which gives exactly what the cache computes itself
(rotation is a pure function of the raw key and its slot). No pickle: a
snapshot is data, never code.

Capturing (cheap copies) is split from encoding (hashing, bytes) so that a
caller can capture under the engine lock and encode outside it. Decoding
checks everything into scratch objects, and only a fully valid snapshot
becomes a Session.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import math
import struct
import sys
from dataclasses import dataclass
from typing import Any, cast

import torch

from worker.errors import SnapshotError
from worker.rotary import RotaryTables
from worker.session import (
    CacheConfig,
    EvictionPolicy,
    SamplingParams,
    Session,
    SessionState,
    TurnProgress,
)
from worker.sink_cache import CacheShape, SinkCache

log = logging.getLogger(__name__)

MAGIC = b"SINKSNAP"
FORMAT_NAME = "sinkserve-session-snapshot"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sI32s")  # magic, header length, header SHA-256
_DTYPES = {str(t)[6:]: t for t in (torch.float32, torch.bfloat16, torch.float16)}
_SAMPLING_TYPES = {
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": int,
    "max_new_tokens": int,
    "seed": (int, type(None)),
}


@dataclass(frozen=True)
class LastReply:
    """What a late interruption needs of the newest finished reply: its
    tokens, the text of each, how many the client acknowledged, and whether
    its last token still waits to be fed."""

    turn: int
    reply_ids: list[int]
    delta_texts: list[str]
    num_pending_reply: int
    num_acked: int


@dataclass(frozen=True)
class SessionImage:
    """Everything a snapshot holds, detached from any live session.

    Invariant: len(token_ids) == len(turn_ids) == k_raw.shape[2] ==
    v.shape[2] (the cache length); the tensors are contiguous, on the CPU.
    """

    session_id: str
    config: CacheConfig
    headroom: int
    pin_target: int
    token_ids: list[int]
    turn_ids: list[int]
    pending: list[tuple[int, int]]
    reply_closed: bool
    num_turns: int
    num_system_tokens: int
    sampling: SamplingParams
    generator_state: bytes
    k_raw: torch.Tensor  # [L, KVH, length, D]
    v: torch.Tensor  # [L, KVH, length, D]
    last_reply: LastReply | None = None


def capture_session(session: Session) -> SessionImage:
    """Copy an idle session's state; call it where the session cannot change.

    Mid-turn sessions are refused: their cache and pending tokens are in
    flux, and a turn cannot be resumed half-way on another worker.
    """
    if session.state is not SessionState.IDLE or session.turn is not None:
        raise SnapshotError(
            f"session {session.session_id} is {session.state.value}; "
            "only an idle session (between turns) can be snapshotted"
        )
    cache = session.cache
    last = session.last_turn
    last_reply = None
    if last is not None:
        last_reply = LastReply(
            turn=last.turn,
            reply_ids=list(last.reply_ids),
            delta_texts=list(last.delta_texts),
            num_pending_reply=last.num_pending_reply,
            num_acked=last.num_acked,
        )
    return SessionImage(
        session_id=session.session_id,
        config=session.config,
        headroom=cache.capacity - cache.cache_size,
        pin_target=cache.pin_target,
        token_ids=list(cache.token_ids),
        turn_ids=list(cache.turn_ids),
        pending=[(int(t), int(turn)) for t, turn in session.pending],
        reply_closed=session.reply_closed,
        num_turns=session.num_turns,
        num_system_tokens=session.num_system_tokens,
        sampling=session.sampling,
        generator_state=bytes(session.generator.get_state().numpy().tobytes()),
        k_raw=cache.raw_keys().to("cpu", copy=True).contiguous(),
        v=cache.v[:, :, : cache.length].to("cpu", copy=True).contiguous(),
        last_reply=last_reply,
    )


def encode_image(image: SessionImage, fingerprint: str) -> bytes:
    """Serialize a captured session; pure, safe outside any lock."""
    # Raw bytes of each tensor (bf16 included) through a uint8 view.
    parts = [t.view(torch.uint8).numpy().tobytes() for t in (image.k_raw, image.v)]
    digest = hashlib.sha256(parts[0])
    digest.update(parts[1])
    num_layers, num_kv_heads, _, head_dim = image.k_raw.shape
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "dtype": str(image.k_raw.dtype).removeprefix("torch."),
        "byteorder": sys.byteorder,
        "shape": [num_layers, num_kv_heads, head_dim],
        "session_id": image.session_id,
        "sink_size": image.config.sink_size,
        "window_size": image.config.window_size,
        "evict_size": image.config.evict_size,
        "eviction": image.config.eviction.value,
        "headroom": image.headroom,
        "pin_target": image.pin_target,
        "length": len(image.token_ids),
        "token_ids": image.token_ids,
        "turn_ids": image.turn_ids,
        "pending": [list(p) for p in image.pending],
        "reply_closed": image.reply_closed,
        "num_turns": image.num_turns,
        "num_system_tokens": image.num_system_tokens,
        "sampling": dataclasses.asdict(image.sampling),
        "generator_state": base64.b64encode(image.generator_state).decode(),
        "last_reply": None
        if image.last_reply is None
        else dataclasses.asdict(image.last_reply),
        "tensor_bytes": sum(len(p) for p in parts),
        "tensor_sha256": digest.hexdigest(),
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    prefix = _PREFIX.pack(MAGIC, len(text), hashlib.sha256(text).digest())
    return b"".join([prefix, text, *parts])


def encode_snapshot(session: Session, fingerprint: str) -> bytes:
    """Capture and encode in one go (the caller keeps the session still)."""
    return encode_image(capture_session(session), fingerprint)


def decode_snapshot(
    blob: bytes,
    fingerprint: str,
    shape: CacheShape,
    rotary: RotaryTables,
    vocab_size: int | None = None,
) -> Session:
    """Rebuild an idle session, on `shape.device`, from a valid snapshot.

    With `vocab_size`, token ids are checked against it too: an id out of
    the embedding table would fail the next forward pass (on a GPU, with a
    device-side assert that takes the whole process down).
    """
    image = parse_snapshot(blob, fingerprint, shape, rotary.max_positions, vocab_size)
    return restore_session(image, shape, rotary)


def parse_snapshot(
    blob: bytes,
    fingerprint: str,
    shape: CacheShape,
    max_positions: int,
    vocab_size: int | None = None,
) -> SessionImage:
    """Check a snapshot against this model and itself; raise SnapshotError."""
    top_id = None if vocab_size is None else vocab_size - 1
    view = memoryview(blob)
    _require(len(view) >= _PREFIX.size, f"truncated snapshot: {len(view)} bytes")
    magic, header_len, header_sha = _PREFIX.unpack_from(view)
    _require(magic == MAGIC, f"not a sinkserve snapshot (magic {magic!r})")
    body = _PREFIX.size + header_len
    _require(len(view) >= body, f"truncated snapshot: {len(view)} bytes, header cut")
    text = bytes(view[_PREFIX.size : body])
    _require(hashlib.sha256(text).digest() == header_sha, "header checksum mismatch")
    try:
        h = json.loads(text)
    except ValueError as e:
        raise SnapshotError(f"header is not JSON: {e}") from None
    _require(isinstance(h, dict), "header is not a JSON object")
    got, ours = (h.get("format"), h.get("version")), (FORMAT_NAME, FORMAT_VERSION)
    _require(got == ours, f"unsupported snapshot format {got}; this reads {ours}")
    got = h.get("fingerprint")
    _require(got == fingerprint, f"snapshot of model {got!r}, not {fingerprint!r}")
    dtype = _DTYPES.get(h.get("dtype"))
    _require(
        dtype == shape.dtype and h.get("byteorder") == sys.byteorder,
        f"snapshot dtype {h.get('dtype')} ({h.get('byteorder')}-endian), this "
        f"cache is {shape.dtype} ({sys.byteorder}-endian)",
    )
    want = [shape.num_layers, shape.num_kv_heads, shape.head_dim]
    _require(
        h.get("shape") == want,
        f"snapshot cache shape {h.get('shape')} (layers, kv heads, head dim), "
        f"this model's is {want}",
    )
    sink, window = _int(h, "sink_size", 0), _int(h, "window_size", 1)
    evict, headroom = _int(h, "evict_size", 1), _int(h, "headroom", 0)
    policies = {p.value: p for p in EvictionPolicy}
    _require(
        h.get("eviction") in policies, f"unknown eviction policy {h.get('eviction')!r}"
    )
    eviction = policies[h["eviction"]]
    cache_size = sink + window
    _require(
        cache_size + headroom <= max_positions,
        f"cache of {cache_size + headroom} slots exceeds the rotary table",
    )
    length = _int(h, "length", 0, cache_size)
    pin_target = _int(h, "pin_target", sink, cache_size)
    num_turns = _int(h, "num_turns", 0)
    token_ids = _ints(h.get("token_ids"), "token_ids", top_id)
    turn_ids = _ints(h.get("turn_ids"), "turn_ids", num_turns)
    _require(
        len(token_ids) == len(turn_ids) == length,
        f"inconsistent lengths: {len(token_ids)} token ids, {len(turn_ids)} turn "
        f"ids, cache length {length}",
    )
    pending = h.get("pending")
    _require(
        isinstance(pending, list)
        and all(isinstance(p, list) and len(p) == 2 for p in pending),
        "pending must be a list of [token id, turn] pairs",
    )
    pending_ids = _ints([p[0] for p in pending], "pending token ids", top_id)
    pending_turns = _ints([p[1] for p in pending], "pending turns", num_turns)
    _require(isinstance(h.get("reply_closed"), bool), "reply_closed is not a bool")
    session_id = h.get("session_id")
    _require(isinstance(session_id, str) and session_id != "", "no session_id")
    try:
        state = base64.b64decode(h.get("generator_state", ""), validate=True)
        scratch = torch.frombuffer(bytearray(state), dtype=torch.uint8)
        torch.Generator().set_state(scratch)
    except (binascii.Error, TypeError, ValueError, RuntimeError) as e:
        raise SnapshotError(f"generator state is invalid: {e}") from None

    pending_pairs = list(zip(pending_ids, pending_turns, strict=True))
    last_reply = _last_reply(
        h.get("last_reply"), num_turns, top_id, token_ids, pin_target, pending_pairs
    )
    k_raw, v = _read_tensors(view[body:], h, [*want[:2], length, want[2]], dtype)
    return SessionImage(
        session_id=session_id,
        config=CacheConfig(sink, window, evict, eviction),
        headroom=headroom,
        pin_target=pin_target,
        token_ids=token_ids,
        turn_ids=turn_ids,
        pending=pending_pairs,
        reply_closed=h["reply_closed"],
        num_turns=num_turns,
        num_system_tokens=_int(h, "num_system_tokens", 0, cache_size),
        sampling=_sampling(h.get("sampling")),
        generator_state=state,
        k_raw=k_raw,
        v=v,
        last_reply=last_reply,
    )


def _last_reply(
    fields: object,
    num_turns: int,
    top_id: int | None,
    token_ids: list[int],
    pin_target: int,
    pending: list[tuple[int, int]],
) -> LastReply | None:
    """Check the newest reply against the cache it must end: its fed tokens
    are the cache's tail (as far as they were not evicted), and a token
    still to be fed is the session's pending one."""
    if fields is None:  # a session with no finished turn, or an older writer
        return None
    keys = {f.name for f in dataclasses.fields(LastReply)}
    _require(
        isinstance(fields, dict) and set(fields) == keys,
        f"last_reply must have exactly the keys {sorted(keys)}",
    )
    turn = _int(fields, "turn", 1, num_turns)
    _require(turn == num_turns, "last_reply is not the newest turn")
    reply_ids = _ints(fields["reply_ids"], "last_reply token ids", top_id)
    texts = fields["delta_texts"]
    # A reply that ended with the end-of-turn marker has no text for it.
    _require(
        isinstance(texts, list)
        and len(reply_ids) - 1 <= len(texts) <= len(reply_ids)
        and all(isinstance(t, str) for t in texts),
        "last_reply texts must be one string per reply token (but the "
        "end-of-turn marker)",
    )
    num_pending = _int(fields, "num_pending_reply", 0, min(1, len(reply_ids)))
    num_acked = _int(fields, "num_acked", 0)
    fed = len(reply_ids) - num_pending
    length = len(token_ids)
    in_cache = min(fed, length - min(pin_target, length))
    _require(
        token_ids[length - in_cache :] == reply_ids[fed - in_cache : fed],
        "last_reply does not match the end of the cache",
    )
    if num_pending:
        _require(
            pending == [(reply_ids[-1], turn)],
            "last_reply's unfed token is not the pending one",
        )
    return LastReply(turn, reply_ids, texts, num_pending, num_acked)


def restore_session(
    image: SessionImage, shape: CacheShape, rotary: RotaryTables
) -> Session:
    """Build a fresh session from a checked image.

    The keys go in through `SinkCache.write` at slot 0, as a prefill would
    put them, so the rotated keys are computed by the cache's own rotation.
    """
    cfg = image.config
    cache = SinkCache(
        shape,
        rotary,
        cfg.sink_size,
        cfg.window_size,
        cfg.evict_size,
        image.headroom,
        whole_turns=cfg.eviction is EvictionPolicy.TURNS,
    )
    if image.token_ids:
        k_raw, v = image.k_raw.to(shape.device), image.v.to(shape.device)
        for layer in range(shape.num_layers):
            cache.write(layer, 0, k_raw[layer], v[layer])
        cache.append(image.token_ids, image.turn_ids)
    session = Session(image.session_id, cache, cfg, image.sampling, [])
    cache.pin_through(image.pin_target)
    session.pending = list(image.pending)
    session.num_system_tokens = image.num_system_tokens
    session.reply_closed = image.reply_closed
    session.num_turns = image.num_turns
    if image.last_reply is not None:
        session.last_turn = _finished_turn(image.last_reply, cache.length)
    state = torch.frombuffer(bytearray(image.generator_state), dtype=torch.uint8)
    session.generator.set_state(state)
    log.debug("session %s restored: %d cached tokens", image.session_id, cache.length)
    return session


def _finished_turn(reply: LastReply, cache_length: int) -> TurnProgress:
    """A finished turn as a late interruption reads it. Where the turn began
    is not kept; only a running turn's rollback reads that."""
    return TurnProgress(
        turn=reply.turn,
        max_new_tokens=len(reply.reply_ids),
        submitted_s=0.0,
        num_reused=0,
        base_length=cache_length,
        saved_pending=[],
        to_prefill=[],
        reply_ids=list(reply.reply_ids),
        delta_texts=list(reply.delta_texts),
        num_pending_reply=reply.num_pending_reply,
        num_acked=reply.num_acked,
    )


def _read_tensors(
    data: memoryview, h: dict[str, Any], dims: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """k_raw and v from the payload, after its length and checksum."""
    each = math.prod(dims) * torch.empty((), dtype=dtype).itemsize
    _require(
        h.get("tensor_bytes") == 2 * each,
        f"header says {h.get('tensor_bytes')} tensor bytes, its geometry {2 * each}",
    )
    _require(
        len(data) == 2 * each,
        f"{'truncated snapshot' if len(data) < 2 * each else 'trailing bytes'}: "
        f"{len(data)} tensor bytes, expected {2 * each}",
    )
    _require(
        hashlib.sha256(data).hexdigest() == h.get("tensor_sha256"),
        "tensor checksum mismatch: the cache data is corrupted",
    )
    if each == 0:
        return torch.empty(dims, dtype=dtype), torch.empty(dims, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
    return flat[: flat.numel() // 2].view(dims), flat[flat.numel() // 2 :].view(dims)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SnapshotError(message)


def _int(h: dict[str, Any], key: str, lo: int, hi: int | None = None) -> int:
    value = h.get(key)
    ok = type(value) is int and value >= lo and (hi is None or value <= hi)
    _require(ok, f"{key} must be an integer in [{lo}, {_top(hi)}]: {value!r}")
    return value


def _ints(values: object, what: str, hi: int | None = None) -> list[int]:
    ok = isinstance(values, list) and all(
        type(x) is int and 0 <= x and (hi is None or x <= hi) for x in values
    )
    _require(ok, f"{what} must be a list of integers in [0, {_top(hi)}]")
    return cast(list[int], values)


def _top(hi: int | None) -> str:
    return "inf" if hi is None else str(hi)


def _sampling(fields: object) -> SamplingParams:
    """Right keys and types; ranges are the engine's to check, as when opening."""
    _require(
        isinstance(fields, dict) and set(fields) == set(_SAMPLING_TYPES),
        f"sampling must have exactly the keys {sorted(_SAMPLING_TYPES)}",
    )
    for key, types in _SAMPLING_TYPES.items():
        value = fields[key]
        ok = isinstance(value, types) and not isinstance(value, bool)
        _require(ok, f"sampling {key} of the wrong type: {value!r}")
    floats = {k: float(fields[k]) for k in ("temperature", "top_p")}
    return SamplingParams(**{**fields, **floats})
