"""Time to first token after a long user turn, with and without eager prefill.

A voice client knows most of a user turn before the user stops speaking: its
recognizer streams growing partial texts. Sent as `PartialUserTurn` messages,
they let the worker prefill the turn while it is spoken, so that when the
final text arrives only the tail (the last few tokens and the template's
closing) is left to feed. Without them the whole turn is prefilled after the
user stops.

The turn is ~200 tokens of real text (a passage of Jane Austen's Emma, with a
question around it), counted with the model's tokenizer. Each measurement uses
a fresh session, so both ways start from the same history (the system prompt):

- eager: partial texts word by word at a speaking pace compressed in time
  (150 words a minute, sped up `--speed-up` times), a growing partial every
  `--words-per-partial` words; then a pause until the worker has caught up
  (the session is listening, every stable token prefilled), as a recognizer's
  end-of-speech pause would give it; then the final partial (final=True);
- baseline: one `UserTurn` with the whole text.

Time to first token runs from just before the client writes the final text
to the first `TokenDelta` it receives. The two ways alternate (which goes
first alternates too), after one unmeasured warm-up of each.

    python -m benchmarks.eager_prefill                 # 5 each, ~1-2 min
    python -m benchmarks.eager_prefill --repetitions 2 --output /tmp/eager.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from benchmarks.barge_in import (
    LOG_FORMAT,
    RESULTS_DIR,
    add_model_flags,
    load_engine,
    write_json,
)
from benchmarks.common import machine
from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation
from services.datasets import austen_text
from services.embedded import Stack, embedded_stack
from worker.chat import ChatFormat
from worker.session import SessionState

log = logging.getLogger(__name__)

SPEAKING_WORDS_PER_S = 150 / 60
OPENING = 'I was reading Emma last night and this passage stayed with me: "'
CLOSING = '" What do you make of Emma in this passage?'
# Where the passage starts: the novel's first sentence.
PASSAGE_START = "Emma Woodhouse, handsome, clever, and rich"


def user_turn(chat: ChatFormat, target_tokens: int) -> str:
    """A question around a passage of Emma, grown word by word to the target."""
    novel = " ".join(austen_text("emma").split())
    words = novel[novel.index(PASSAGE_START) :].split()
    count = 1
    while len(chat.encode(OPENING + " ".join(words[:count]) + CLOSING)) < (
        target_tokens
    ):
        count += 1
    return OPENING + " ".join(words[:count]) + CLOSING


@dataclass
class Sample:
    mode: str  # "eager" or "baseline"
    ttft_ms: float  # client: final text sent -> first TokenDelta
    worker_ttft_ms: float  # worker: final text arrived -> first token sampled
    num_prefilled: int  # tokens the turn fed, revisions included
    partials: int  # PartialUserTurn messages before the final one
    catch_up_ms: float  # eager: last partial sent -> the worker listening


async def wait_listening(stack: Stack, session_id: str, limit_s: float) -> bool:
    """Poll the engine until the session has prefilled every stable token."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        session = stack.engine.sessions.get(session_id)
        if session is not None and session.state is SessionState.LISTENING:
            return True
        await asyncio.sleep(0.002)
    return False


async def measure(
    stack: Stack, text: str, eager: bool, args: argparse.Namespace
) -> Sample:
    """One turn in a fresh session, eager or not; times its first token."""
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        conversation = Conversation(channel)
        sampling = pb.SamplingParams(max_new_tokens=args.reply_tokens)
        await conversation.open(sampling=sampling)
        partials = 0
        catch_up_ms = 0.0
        if eager:
            words = text.split()
            pace_s = 1.0 / (SPEAKING_WORDS_PER_S * args.speed_up)
            step = args.words_per_partial
            for count in range(step, len(words) + step, step):
                await asyncio.sleep(pace_s * step)
                partial = pb.PartialUserTurn(text=" ".join(words[:count]))
                await conversation.send(pb.ClientMessage(partial_user_turn=partial))
                partials += 1
            last_s = time.perf_counter()
            if not await wait_listening(stack, conversation.session_id, 30.0):
                log.warning("the worker did not catch up within 30 s")
            catch_up_ms = (time.perf_counter() - last_s) * 1000.0
            final = pb.PartialUserTurn(text=text, final=True)
            message = pb.ClientMessage(partial_user_turn=final)
        else:
            message = pb.ClientMessage(user_turn=pb.UserTurn(text=text))
        sent_s = time.perf_counter()
        await conversation.send(message)
        ttft_ms = None
        async for event in conversation.reply():
            kind = event.WhichOneof("kind")
            if kind == "token" and ttft_ms is None:
                ttft_ms = (time.perf_counter() - sent_s) * 1000.0
            elif kind == "turn_end":
                stats = event.turn_end.stats
        await conversation.close()
    return Sample(
        mode="eager" if eager else "baseline",
        ttft_ms=ttft_ms,
        worker_ttft_ms=stats.ttft_ms,
        num_prefilled=stats.num_prefilled,
        partials=partials,
        catch_up_ms=catch_up_ms,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    engine = await asyncio.to_thread(load_engine, args)
    machine_before = machine()  # after load_engine has set the threads
    text = user_turn(engine.chat, args.turn_tokens)
    turn_tokens = len(engine.chat.encode(text))
    log.info("user turn: %d tokens, %d words", turn_tokens, len(text.split()))
    samples: list[Sample] = []
    async with embedded_stack(engine) as stack:
        for eager in (True, False):  # warm-up, not counted
            await measure(stack, text, eager, args)
        for repetition in range(args.repetitions):
            order = (True, False) if repetition % 2 == 0 else (False, True)
            for eager in order:
                sample = await measure(stack, text, eager, args)
                samples.append(sample)
                log.info(
                    "%s: ttft %.1f ms (worker %.1f ms, %d tokens prefilled)",
                    sample.mode,
                    sample.ttft_ms,
                    sample.worker_ttft_ms,
                    sample.num_prefilled,
                )

    def median(mode: str, key: str) -> float:
        return statistics.median(getattr(s, key) for s in samples if s.mode == mode)

    eager_ms = median("eager", "ttft_ms")
    baseline_ms = median("baseline", "ttft_ms")
    return {
        "benchmark": "eager_prefill",
        "model": engine.loaded.name,
        "device": args.device,
        "dtype": args.dtype,
        "machine": machine_before,
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": {
            "repetitions": args.repetitions,
            "turn_tokens": turn_tokens,
            "turn_words": len(text.split()),
            "words_per_partial": args.words_per_partial,
            "speaking_words_per_s": SPEAKING_WORDS_PER_S,
            "speed_up": args.speed_up,
            "reply_tokens": args.reply_tokens,
            "history": "a fresh session per measurement (system prompt only)",
            "engine": asdict(engine.config),
        },
        "text": text,
        "elapsed_s": time.perf_counter() - started,
        "median_ttft_ms": {"eager": eager_ms, "baseline": baseline_ms},
        "median_worker_ttft_ms": {
            "eager": median("eager", "worker_ttft_ms"),
            "baseline": median("baseline", "worker_ttft_ms"),
        },
        "median_eager_catch_up_ms": median("eager", "catch_up_ms"),
        "speedup_baseline_over_eager": baseline_ms / eager_ms,
        "samples": [asdict(s) for s in samples],
    }


def summary(result: dict[str, Any]) -> str:
    config = result["config"]
    ttft = result["median_ttft_ms"]
    worker = result["median_worker_ttft_ms"]
    return (
        f"{config['repetitions']} repetitions each in {result['elapsed_s']:.0f} s "
        f"on {result['machine']['cpu']} ({result['device']}, {result['dtype']}, "
        f"{result['machine']['torch_threads']} threads), "
        f"load average {result['machine'].get('loadavg_at_start')}\n"
        f"user turn: {config['turn_tokens']} tokens\n"
        f"median time to first token, eager:    {ttft['eager']:.1f} ms "
        f"(worker {worker['eager']:.1f} ms)\n"
        f"median time to first token, baseline: {ttft['baseline']:.1f} ms "
        f"(worker {worker['baseline']:.1f} ms)\n"
        f"baseline / eager: {result['speedup_baseline_over_eager']:.2f}x"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.eager_prefill", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--turn-tokens", type=int, default=200)
    parser.add_argument("--words-per-partial", type=int, default=3)
    parser.add_argument(
        "--speed-up", type=float, default=10.0, help="times faster than speech"
    )
    parser.add_argument(
        "--reply-tokens", type=int, default=4, help="only the first one is timed"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS_DIR / "eager_prefill.json"
    )
    add_model_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for name in ("transformers", "httpx", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    result = asyncio.run(run(args))
    write_json(args.output, result)
    print(summary(result))


if __name__ == "__main__":
    main()
