"""Streaming detokenization: text deltas that never split a character."""

from __future__ import annotations


class StreamDecoder:
    """Decodes a growing token list into text deltas.

    A token can end in the middle of a UTF-8 character, and tokenizers that
    strip a leading space decode a token differently at the start of a text.
    So each delta is the difference between two decodings of a short tail of
    the reply, and nothing is released while it ends in a replacement char.
    """

    def __init__(self, tokenizer: object, skip_ids: set[int]):
        self.tokenizer = tokenizer
        self.skip_ids = skip_ids
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        if token_id in self.skip_ids:
            return ""
        self.token_ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = decode(self.token_ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full[len(prefix) :]
