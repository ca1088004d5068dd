"""Serving benchmarks, each row side by side with its baseline in one run.

    python -m benchmarks.serving [--rows 1,2,3,4,5] [--quick]

1. Decode time per token against tokens streamed, against the StreamingLLM
   paper's baseline (a sliding window recomputed for every token).
2. Time to first token by turn on MT-Bench, against re-sending the whole
   history to `transformers` every turn.
3. Aggregate decode throughput against concurrent sessions, against
   `transformers` batched `generate` on the same prompts.
4. Single-session decode speed against the machine's memory-bandwidth limit.
5. Gateway overhead: per-token latency through the gateway against straight
   to the worker.

Results go to benchmarks/results/serving.json; docs/benchmarks.md explains.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import grpc
import torch
from transformers import GenerationConfig

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation
from services.datasets import austen_text, mtbench_questions
from services.embedded import embedded_stack
from worker.engine import Engine, EngineConfig
from worker.model import LoadedModel, load_model, resolve_model
from worker.runner import ModelRunner
from worker.session import SamplingParams, TurnEndEvent
from worker.sink_cache import SinkCache

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs (after one warm-up)."""
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


@torch.inference_mode()
def row_decode_vs_streamed(loaded: LoadedModel, marks: list[int], quick: bool) -> dict:
    """Row 1: our decode step after N tokens, and recompute per token."""
    text = loaded.tokenizer.encode(austen_text("emma"), add_special_tokens=False)
    runner = ModelRunner(loaded)
    engine = Engine(loaded)
    cache = SinkCache(engine.cache_shape, loaded.rotary, 4, 1020, evict_size=32)
    ours = {}
    fed = 0
    for mark in marks:
        while fed < mark:
            size = min(508, mark - fed)
            runner.forward([(cache, text[fed : fed + size], [1] * size)])
            fed += size
        token = [text[fed]]

        def step(cache=cache, token=token) -> None:
            runner.forward([(cache, token, [1])])

        ours[mark] = timed(step, 5 if quick else 15)
        log.info("decode after %d tokens: %.1f ms", mark, ours[mark] * 1000)

    model = loaded.model
    recompute = {}
    for window in (256, 512, 1024, 2048):
        ids = torch.tensor([text[:window]])
        # The library's own attention, no cache: the paper's baseline.
        model.set_attn_implementation("sdpa")
        try:
            recompute[window] = timed(lambda ids=ids: model(ids, logits_to_keep=1), 3)
        finally:
            model.set_attn_implementation("sinkserve")
    ours_at_cache = statistics.median(ours.values())
    return {
        "ours_step_s_by_tokens_streamed": ours,
        "flatness": (max(ours.values()) - min(ours.values())) / min(ours.values()),
        "recompute_step_s_by_window": recompute,
        "speedup_at_1024": recompute[1024] / ours_at_cache,
        "speedup_at_2048_vs_ours_1024": recompute[2048] / ours_at_cache,
    }


@torch.inference_mode()
def row_ttft_by_turn(loaded: LoadedModel, turns: int, reply_tokens: int) -> dict:
    """Row 2: TTFT of turn k, ours against re-sending the history."""
    questions = [t for q in mtbench_questions() for t in q.turns][:turns]
    engine = Engine(loaded, EngineConfig(window_size=4092, max_window_size=4092))
    session = engine.open_session(None, SamplingParams(max_new_tokens=reply_tokens))
    events: list = []
    session.sink = events.append
    ours, history_lengths = [], []
    for question in questions:
        engine.submit_turn(session.session_id, question)
        while session.busy:
            engine.step()
        end = [e for e in events if isinstance(e, TurnEndEvent)][-1]
        ours.append(end.stats.ttft_ms / 1000)
        history_lengths.append(end.stats.num_reused + end.stats.num_prefilled)
    # Baseline: the whole history up to each turn's reply, prefilled afresh.
    full = session.cache.token_ids
    model = loaded.model
    model.set_attn_implementation("sdpa")
    baseline = []
    try:
        for length in history_lengths:
            ids = torch.tensor([full[:length]])
            baseline.append(timed(lambda ids=ids: model(ids, logits_to_keep=1), 1))
    finally:
        model.set_attn_implementation("sinkserve")
    picks = [k for k in (1, 5, 10, 20) if k <= turns]
    return {
        "reply_tokens": reply_tokens,
        "history_tokens": {k: history_lengths[k - 1] for k in picks},
        "ours_ttft_s": {k: ours[k - 1] for k in picks},
        "resend_ttft_s": {k: baseline[k - 1] for k in picks},
        "speedup": {k: baseline[k - 1] / ours[k - 1] for k in picks},
    }


@torch.inference_mode()
def row_throughput(loaded: LoadedModel, batch_sizes: list[int], steps: int) -> dict:
    """Row 3: aggregate decode tokens/s with B sessions, ours and HF batched."""
    tokenizer = loaded.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a long story about the sea."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    runner = ModelRunner(loaded)
    engine = Engine(loaded)
    ours, hf, cb = {}, {}, {}
    model = loaded.model
    # Continuous batching in transformers: paged attention, no eos stop.
    cb_config = GenerationConfig(
        max_new_tokens=steps, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    for batch in batch_sizes:
        caches = [
            SinkCache(engine.cache_shape, loaded.rotary, 4, 1020) for _ in range(batch)
        ]
        runner.forward([(c, prompt, [1] * len(prompt)) for c in caches])
        work = [(c, [prompt[-1]], [1]) for c in caches]
        runner.forward(work)
        started = time.perf_counter()
        for _ in range(steps):
            runner.forward(work)
        ours[batch] = batch * steps / (time.perf_counter() - started)

        model.set_attn_implementation("sdpa")
        try:
            ids = torch.tensor([prompt] * batch)
            model.generate(ids, max_new_tokens=2, do_sample=False, min_new_tokens=2)
            started = time.perf_counter()
            model.generate(
                ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False
            )
            hf[batch] = batch * steps / (time.perf_counter() - started)
            model.generate_batch(
                [prompt] * batch, generation_config=cb_config, progress_bar=False
            )
            started = time.perf_counter()
            model.generate_batch(
                [prompt] * batch, generation_config=cb_config, progress_bar=False
            )
            cb[batch] = batch * steps / (time.perf_counter() - started)
        finally:
            model.set_attn_implementation("sinkserve")
        log.info(
            "batch %d: ours %.1f tok/s, transformers %.1f tok/s",
            batch,
            ours[batch],
            hf[batch],
        )
    return {
        "ours_tokens_per_s": ours,
        "transformers_generate_tokens_per_s": hf,
        "transformers_continuous_batching_tokens_per_s": cb,
        "ours_vs_continuous_batching": {b: ours[b] / cb[b] for b in ours},
        "ours_scaling_vs_single": {b: ours[b] / ours[batch_sizes[0]] for b in ours},
        "ours_vs_transformers": {b: ours[b] / hf[b] for b in ours},
    }


def row_bandwidth_limit(loaded: LoadedModel, single_step_s: float) -> dict:
    """Row 4: measured tokens/s against weight bytes / memory bandwidth."""
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB of fp32
    seconds = timed(lambda: big.sum(), 5)
    bandwidth = big.numel() * 4 / seconds
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    limit = bandwidth / weight_bytes
    measured = 1 / single_step_s
    return {
        "read_bandwidth_bytes_per_s": bandwidth,
        "weight_bytes": weight_bytes,
        "limit_tokens_per_s": limit,
        "measured_tokens_per_s": measured,
        "fraction_of_limit": measured / limit,
    }


async def _token_gaps(address: str, tokens: int) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        conversation = Conversation(channel)
        await conversation.open(
            sampling=pb.SamplingParams(max_new_tokens=tokens, temperature=0.0)
        )
        stamps = []
        async for message in conversation.ask("Write a long story about a lighthouse."):
            if message.WhichOneof("kind") == "token":
                stamps.append(time.perf_counter())
        await conversation.close()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


async def _gateway_overhead(loaded: LoadedModel, tokens: int, rounds: int) -> dict:
    engine = Engine(loaded)
    via_gateway, direct = [], []
    async with embedded_stack(engine) as stack:
        for _ in range(rounds):
            via_gateway += await _token_gaps(stack.gateway_address, tokens)
            direct += await _token_gaps(stack.worker_address, tokens)
    gateway_ms = statistics.median(via_gateway) * 1000
    direct_ms = statistics.median(direct) * 1000
    return {
        "median_inter_token_ms_via_gateway": gateway_ms,
        "median_inter_token_ms_direct": direct_ms,
        "overhead_ms_per_token": gateway_ms - direct_ms,
        "ratio": gateway_ms / direct_ms,
    }


def machine() -> dict:
    model_name = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model_name = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": model_name,
        "cores": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,5")
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes, for a smoke run"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = {int(r) for r in args.rows.split(",")}
    loaded = load_model(resolve_model("smollm2"))
    result: dict = {"machine": machine(), "model": "SmolLM2-135M-Instruct fp32"}
    quick = args.quick
    if 1 in rows or 4 in rows:
        marks = [1_000, 4_000] if quick else [1_000, 4_000, 16_000, 64_000]
        result["row1_decode_vs_streamed"] = row_decode_vs_streamed(loaded, marks, quick)
    if 2 in rows:
        result["row2_ttft_by_turn"] = row_ttft_by_turn(loaded, 5 if quick else 20, 48)
    if 3 in rows:
        sizes = [1, 4] if quick else [1, 2, 4, 8, 16, 32]
        result["row3_throughput"] = row_throughput(loaded, sizes, 8 if quick else 24)
    if 4 in rows:
        step_s = result["row1_decode_vs_streamed"]["ours_step_s_by_tokens_streamed"]
        result["row4_bandwidth"] = row_bandwidth_limit(loaded, min(step_s.values()))
    if 5 in rows:
        result["row5_gateway"] = asyncio.run(
            _gateway_overhead(loaded, 16 if quick else 48, 1 if quick else 3)
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("serving_quick.json" if quick else "serving.json")
    out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
