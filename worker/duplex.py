"""Full duplex: prefill a user turn while it is still being spoken.

A speech recognizer sends partial texts, revises them, then sends the final
text. Each partial is tokenized as the turn's increment so far; all but its
last few tokens are stable (later text cannot re-merge them) and are fed
eagerly. A revision rolls the cache back to the longest prefix shared with the
new tokens and feeds the difference. The final text adds the template's
closing, so when it arrives only the tail is left to prefill.
"""

from __future__ import annotations

from worker.chat import ChatFormat
from worker.session import Session, TurnProgress

# Trailing tokens of a partial text not fed yet: more text may merge them.
HOLDBACK_TOKENS = 2


def target_tokens(
    chat: ChatFormat, turn: TurnProgress, text: str, final: bool
) -> list[tuple[int, int]]:
    """(token, turn) the turn should have fed: pending, then the increment."""
    if final:
        increment = chat.user_tokens(text, turn.first, turn.lead_closed)
    else:
        increment = chat.user_tokens_open(text, turn.first, turn.lead_closed)
        increment = increment[: max(len(increment) - HOLDBACK_TOKENS, 0)]
    return turn.saved_pending + [(t, turn.turn) for t in increment]


def revise(session: Session, turn: TurnProgress, target: list[tuple[int, int]]) -> int:
    """Make the turn feed `target`: roll back to the shared prefix, queue the
    rest. The session must not be in a forward pass. Returns the tokens rolled
    back."""
    fed = turn.fed_ids
    shared = 0
    for mine, (theirs, _) in zip(fed, target, strict=False):
        if mine != theirs:
            break
        shared += 1
    cache = session.cache
    in_cache = min(len(fed), cache.length - cache.num_pinned)
    # Tokens of this turn already evicted cannot be rolled back.
    drop = min(len(fed) - shared, in_cache)
    if drop:
        cache.truncate(cache.length - drop)
        del fed[len(fed) - drop :]
    turn.to_prefill = target[len(fed) :]
    return drop
