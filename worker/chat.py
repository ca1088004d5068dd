"""Chat-template increments: the new tokens of each turn, and nothing else.

A session never re-tokenizes earlier text: re-encoding a reply can merge its
tokens differently (two newlines into one double-newline token, say) and then
nothing matches the cache. Instead the model's own chat template is rendered
once with sentinel strings, and cut at the sentinels into the pieces that
surround each message. A turn's increment is those pieces around the new
text, so the increments, with the generated tokens between them, add up to
the template's rendering of the whole conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

_SYSTEM = "\x00SINKSERVE_SYSTEM\x00"
_USER_1 = "\x00SINKSERVE_USER_1\x00"
_REPLY = "\x00SINKSERVE_REPLY\x00"
_USER_2 = "\x00SINKSERVE_USER_2\x00"


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be cut into turn increments."""


@dataclass(frozen=True)
class TemplatePieces:
    system_prefix: str  # before the system prompt
    system_suffix: str  # after the system prompt, before the first user turn
    default_system: str | None  # what the template renders with no system prompt
    user_prefix_first: str  # before the first user text, after the system block
    user_suffix: str  # after a user text: closes it and opens the reply
    after_reply: str  # after a reply's text, before the next user text


class ChatFormat:
    """Turns system prompts and user turns into token increments."""

    def __init__(self, tokenizer: object):
        self.tokenizer = tokenizer
        self.pieces = _cut_template(tokenizer)
        self.end_of_turn_ids = _end_of_turn_ids(tokenizer)
        # The token the model ends a reply with, as the template writes it.
        self.end_of_turn_text = tokenizer.decode([self.end_of_turn_ids[0]])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def system_tokens(self, system_prompt: str | None) -> list[int]:
        """The conversation's opening: the system block (pinned in the cache)."""
        p = self.pieces
        if system_prompt is None:
            return self.encode(p.default_system or "")
        return self.encode(p.system_prefix + system_prompt + p.system_suffix)

    def user_tokens(self, text: str, first: bool, reply_closed: bool) -> list[int]:
        """The increment for a user turn, ending with the reply's opening.

        `reply_closed` says the previous reply already ended with the
        end-of-turn token; otherwise (cut short, or interrupted) the increment
        closes it.
        """
        return self.encode(
            self._lead(first, reply_closed) + text + self.pieces.user_suffix
        )

    def user_tokens_open(self, text: str, first: bool, reply_closed: bool) -> list[int]:
        """A user turn still being spoken: its increment without the closing."""
        return self.encode(self._lead(first, reply_closed) + text)

    def _lead(self, first: bool, reply_closed: bool) -> str:
        if first:
            return self.pieces.user_prefix_first
        lead = self.pieces.after_reply
        if reply_closed and lead.startswith(self.end_of_turn_text):
            lead = lead[len(self.end_of_turn_text) :]
        return lead


def _render(tokenizer: object, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation
    )


def _cut_template(tokenizer: object) -> TemplatePieces:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template")
    system = {"role": "system", "content": _SYSTEM}
    user_1 = {"role": "user", "content": _USER_1}
    reply = {"role": "assistant", "content": _REPLY}
    user_2 = {"role": "user", "content": _USER_2}

    system_only = _render(tokenizer, [system], False)
    first = _render(tokenizer, [system, user_1], True)
    second = _render(tokenizer, [system, user_1, reply, user_2], True)
    bare = _render(tokenizer, [user_1], True)
    if not first.startswith(system_only) or not second.startswith(
        first[: first.index(_USER_1)]
    ):
        raise TemplateError("the chat template does not render turns as a prefix")

    system_prefix, system_suffix = system_only.split(_SYSTEM)
    user_prefix_first = first[len(system_only) : first.index(_USER_1)]
    user_suffix = first[first.index(_USER_1) + len(_USER_1) :]
    after_reply = second[second.index(_REPLY) + len(_REPLY) : second.index(_USER_2)]
    if not second.endswith(_USER_2 + user_suffix):
        raise TemplateError("the chat template closes user turns inconsistently")
    if (
        second[second.index(_USER_1) + len(_USER_1) : second.index(_REPLY)]
        != user_suffix
    ):
        raise TemplateError("the chat template renders past replies unlike new ones")

    head = bare[: bare.index(_USER_1)]
    default_system = head[: -len(user_prefix_first)] if user_prefix_first else head
    if not head.endswith(user_prefix_first):
        default_system = None
    return TemplatePieces(
        system_prefix,
        system_suffix,
        default_system,
        user_prefix_first,
        user_suffix,
        after_reply,
    )


def _end_of_turn_ids(tokenizer: object) -> list[int]:
    ids = []
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise TemplateError("the tokenizer names no end-of-turn or EOS token")
    return ids
