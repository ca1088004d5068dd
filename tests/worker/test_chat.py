"""Turn increments add up to the model's own rendering of the conversation."""

from __future__ import annotations

import pytest

from worker.chat import ChatFormat

REPLIES = ["Paris.\n\nIt is lovely.", "Berlin,  of course!", "A haiku:\nsea\n\nfoam"]
QUESTIONS = ["Capital of France?", "And Germany?\n\n", "Write a haiku.", "Thanks"]


def tokens_of_conversation(chat: ChatFormat, system: str | None) -> list[int]:
    """What a session feeds: increments, with each reply tokenized alone."""
    tokens = chat.system_tokens(system)
    for i, question in enumerate(QUESTIONS):
        tokens += chat.user_tokens(question, first=i == 0, reply_closed=True)
        if i < len(REPLIES):
            tokens += chat.encode(REPLIES[i]) + [chat.end_of_turn_ids[0]]
    return tokens


def messages(system: str | None) -> list[dict]:
    out = [] if system is None else [{"role": "system", "content": system}]
    for i, question in enumerate(QUESTIONS):
        out.append({"role": "user", "content": question})
        if i < len(REPLIES):
            out.append({"role": "assistant", "content": REPLIES[i]})
    return out


@pytest.mark.parametrize("system", ["You are terse.", None])
def test_increments_equal_the_template(tokenizer, system):
    chat = ChatFormat(tokenizer)
    ours = tokens_of_conversation(chat, system)
    whole = tokenizer.apply_chat_template(
        messages(system), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ours == whole
    text = tokenizer.apply_chat_template(
        messages(system), add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(ours) == text


def test_bos_appears_once_at_position_zero(tokenizer):
    chat = ChatFormat(tokenizer)
    tokens = tokens_of_conversation(chat, "Be kind.")
    bos = tokenizer.bos_token_id
    # SmolLM2's BOS is also its message-start marker: it opens every message,
    # and the increments add no extra one anywhere.
    starts = [i for i, t in enumerate(tokens) if t == bos]
    assert starts[0] == 0
    # the system block, each user turn, each reply, and the generation prompt
    assert len(starts) == 1 + len(QUESTIONS) + len(REPLIES) + 1
    assert tokens[1] != bos


def test_unclosed_reply_is_closed_by_the_next_turn(tokenizer):
    chat = ChatFormat(tokenizer)
    closed = chat.user_tokens("Next", first=False, reply_closed=True)
    unclosed = chat.user_tokens("Next", first=False, reply_closed=False)
    assert unclosed == [chat.end_of_turn_ids[0]] + closed
