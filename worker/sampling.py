"""Picking the next token from a session's logits."""

from __future__ import annotations

import torch

from worker.session import SamplingParams


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> int:
    """logits [V] fp32 -> one token id; greedy when temperature is 0."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (at least one).
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
