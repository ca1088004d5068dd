"""One forward pass over the new tokens of several sessions at once."""

from __future__ import annotations

import torch

from worker.attention import PackedStep, Segment
from worker.model import LoadedModel
from worker.sink_cache import Eviction, SinkCache


class ForwardFailed(RuntimeError):
    """A forward pass failed; `evictions` lists what each cache evicted first.

    Caches make room before the model runs, so a failed pass can leave
    evictions behind; they are real and must still be reported.
    """

    def __init__(self, evictions: list[list[Eviction]]):
        super().__init__("the forward pass failed")
        self.evictions = evictions


class ModelRunner:
    """Runs packed steps: prefill chunks and decode tokens side by side."""

    def __init__(self, loaded: LoadedModel, library_forward: bool = False):
        self.loaded = loaded
        self.model = loaded.model
        self.device = next(self.model.parameters()).device
        # The library's forward instead of the worker's own, for comparison.
        self.decoder = None if library_forward else loaded.decoder

    @torch.inference_mode()
    def forward(
        self,
        work: list[tuple[SinkCache, list[int], list[int]]],
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, list[list[Eviction]]]:
        """Feed each (cache, token_ids, turn_ids); return next-token logits.

        The caches make room first (evicting their oldest unpinned tokens),
        then every token is written at its in-cache slot; a chunk larger than
        the window is trimmed afterwards. Returns logits [N, V] (fp32) for the
        last token of each item (with `all_logits`, [T, V] for every token of
        the packed row), and the evictions each cache made.
        """
        if len({id(cache) for cache, _, _ in work}) != len(work):
            raise ValueError("a cache can take part in a step only once")
        if any(not token_ids for _, token_ids, _ in work):
            raise ValueError("every item of a step needs at least one token")
        evictions: list[list[Eviction]] = [[] for _ in work]
        try:
            return self._forward(work, all_logits, evictions)
        except Exception as error:
            raise ForwardFailed(evictions) from error

    def _forward(
        self,
        work: list[tuple[SinkCache, list[int], list[int]]],
        all_logits: bool,
        evictions: list[list[Eviction]],
    ) -> tuple[torch.Tensor, list[list[Eviction]]]:
        segments = []
        offset = 0
        for i, (cache, token_ids, _) in enumerate(work):
            made = cache.make_room(len(token_ids))
            if made:
                evictions[i].append(made)
            segments.append(Segment(cache, token_ids, offset, cache.length))
            offset += len(token_ids)

        flat = [t for _, token_ids, _ in work for t in token_ids]
        input_ids = torch.tensor(flat, device=self.device)  # [T]
        last = torch.tensor(
            [s.offset + s.num_tokens - 1 for s in segments], device=self.device
        )
        step = PackedStep(segments, self.loaded.rotary)
        logits = self._run_model(input_ids, step, None if all_logits else last)

        for i, (cache, token_ids, turn_ids) in enumerate(work):
            cache.append(token_ids, turn_ids)
            trimmed = cache.trim()
            if trimmed:
                evictions[i].append(trimmed)
        return logits.float(), evictions  # [N, V]

    def _run_model(
        self, input_ids: torch.Tensor, step: PackedStep, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """input_ids [T] -> logits [N, V] of the rows in `keep` (all if None)."""
        if self.decoder is not None:
            return self.decoder(input_ids, step, keep)
        # The library's forward with every position at zero: its rotary
        # embedding is the identity, and attention rotates in the cache.
        out = self.model(
            input_ids=input_ids[None],
            position_ids=torch.zeros_like(input_ids)[None],
            use_cache=False,
            logits_to_keep=0 if keep is None else keep,
            packed_step=step,
        )
        return out.logits[0]
