"""Barge-in: cut a reply back to what the listener heard.

A reply's tokens are the newest in its session's cache, except the last one
sampled, which waits to be fed with the next turn. Cutting the reply after
`heard` tokens truncates the cache tail to the heard tokens and drops what
was pending; the next turn then closes the reply with the end-of-turn marker,
so the cache holds exactly the heard tokens followed by that marker. Heard
tokens that had already left the window cannot be kept; the cut says how many.
"""

from __future__ import annotations

from worker.session import Cut, Session, TurnProgress


def heard_from_chars(turn: TurnProgress, heard_chars: int) -> int:
    """Tokens whose text lies wholly within the first `heard_chars` characters.

    A token that completes no character on its own (part of a multi-byte
    character) counts as heard only with the token that completes it.
    """
    total = 0
    heard = 0
    for index, text in enumerate(turn.delta_texts):
        total += len(text)
        if total > heard_chars:
            break
        if text:
            heard = index + 1
    return heard


def resolve_heard(
    turn: TurnProgress, heard_tokens: int | None, heard_chars: int | None
) -> int:
    """How many reply tokens were heard; the last acknowledgement by default."""
    if heard_tokens is not None:
        return heard_tokens
    if heard_chars is not None:
        return heard_from_chars(turn, heard_chars)
    return turn.num_acked


def cut_reply(
    session: Session, turn: TurnProgress, heard: int, end_ids: set[int]
) -> Cut:
    """Truncate the session to the first `heard` tokens of `turn`'s reply.

    The turn must be the session's newest and must not be in a forward pass.
    Sets what the next turn feeds first: the last sampled token if it was
    heard, else nothing (the next turn closes the reply).
    """
    reply = turn.reply_ids
    ended = bool(reply) and reply[-1] in end_ids
    spoken = len(reply) - (1 if ended else 0)
    kept = min(heard, spoken)
    clamped = heard > spoken
    cache = session.cache
    fed = len(reply) - turn.num_pending_reply
    in_cache = min(fed, cache.length - cache.num_pinned)
    evicted = fed - in_cache
    lost = min(kept, evicted)
    text = "".join(turn.delta_texts[:kept])
    if kept == spoken:  # every spoken token was heard: nothing to cut
        last = [(reply[-1], turn.turn)] if reply and turn.num_pending_reply else []
        session.pending = last
        session.reply_closed = ended
        return Cut(turn.turn, kept, 0, lost, clamped, text)

    keep_in_cache = max(0, kept - evicted)
    cache.truncate(cache.length - in_cache + keep_in_cache)
    session.pending = []
    session.reply_closed = False
    rolled_back = len(reply) - kept
    del reply[kept:]
    del turn.delta_texts[kept:]
    turn.num_pending_reply = 0
    return Cut(turn.turn, kept, rolled_back, lost, clamped, text)
