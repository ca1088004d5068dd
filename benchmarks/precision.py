"""What serving in bf16 on the CPU costs in quality, against fp32, one run.

    python -m benchmarks.precision [--tokens 8192]

Streams the same tokens of *Emma* through a 4 + 1,020 sink cache twice, once
with the model in fp32 and once in bf16 (weights, activations and cache),
in chunks of 256 that every token of both runs sees identically, and
reports perplexity, how often the two agree on the most likely next token,
and the speed of a prefill chunk and a decode step in each precision.
Results go to benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine
from benchmarks.serving import _decode, timed
from services.datasets import austen_text
from worker.engine import Engine
from worker.model import load_model, resolve_model
from worker.runner import ModelRunner
from worker.sink_cache import SinkCache

RESULTS = Path(__file__).parent / "results"
CHUNK = 256


@torch.inference_mode()
def stream(dtype: torch.dtype, ids: list[int]) -> dict:
    loaded = load_model(resolve_model("smollm2"), dtype)
    runner = ModelRunner(loaded)
    shape = Engine(loaded).cache_shape
    cache = SinkCache(shape, loaded.rotary, 4, 1020, evict_size=32)
    nll, top1 = [], []
    for start in range(0, len(ids) - 1, CHUNK):
        piece = ids[start : start + CHUNK]
        logits, _ = runner.forward([(cache, piece, [1] * len(piece))], all_logits=True)
        targets = torch.tensor(ids[start + 1 : start + 1 + len(piece)])
        logits = logits[: len(targets)]
        nll.append(F.cross_entropy(logits, targets, reduction="none"))
        top1.append(logits.argmax(-1))

    # Fresh caches made beforehand: allocating and zeroing one is not prefill.
    fresh = [SinkCache(shape, loaded.rotary, 4, 1020) for _ in range(6)]

    def one_chunk() -> None:
        runner.forward([(fresh.pop(), ids[:CHUNK], [1] * CHUNK)])

    prefill = timed(one_chunk, 5)
    decode = timed(_decode(runner, cache, ids[:1]), 15)
    return {
        "nll": torch.cat(nll),
        "top1": torch.cat(top1),
        "prefill_chunk_s": prefill,
        "decode_step_s": decode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=RESULTS / "precision.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    text = austen_text("emma")
    loaded = load_model(resolve_model("smollm2"))
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)[: args.tokens]
    del loaded
    runs = {name: stream(getattr(torch, name), ids) for name in ("float32", "bfloat16")}
    full, half = runs["float32"], runs["bfloat16"]
    result = {
        "tokens_scored": len(full["nll"]),
        "cache": "4 sinks + 1,020 window, chunks of 256",
        "threads": torch.get_num_threads(),
    }
    for name, run in runs.items():
        result[name] = {
            "perplexity": math.exp(run["nll"].mean().item()),
            "prefill_chunk_s": run["prefill_chunk_s"],
            "decode_step_s": run["decode_step_s"],
        }
    result["bf16_over_fp32_perplexity"] = (
        result["bfloat16"]["perplexity"] / result["float32"]["perplexity"]
    )
    result["top1_agreement"] = (full["top1"] == half["top1"]).float().mean().item()
    result["prefill_speedup"] = full["prefill_chunk_s"] / half["prefill_chunk_s"]
    result["decode_speedup"] = full["decode_step_s"] / half["decode_step_s"]
    result["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
