"""Interruption latency on the real model, through gateway and worker.

One session asks MT-Bench questions one after another. While a reply is being
generated, after a random number of received tokens, the client sends an
`Interrupt` (half with `heard_tokens`, half with no heard point after an `Ack`)
and times, from just before the write:

- the `Interrupted` event, the server's confirmation that the reply is cut
  and no token of it follows (the headline latency);
- the cut reply's `TurnEnd` (END_REASON_INTERRUPTED), its very last message;
- the last `TokenDelta` that still arrived after the interrupt was sent, if any.

Latencies are reported next to one decode step, measured in the same run from
the inter-arrival times of the reply tokens received before each interrupt,
and from the worker's own inter-token and step histograms. The worker checks
for an interruption between forward passes, so the expected latency is up to
one step plus two gRPC hops.

    python -m benchmarks.barge_in                      # 50 interruptions, ~2-4 min
    python -m benchmarks.barge_in --interruptions 10 --output /tmp/barge_in.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from benchmarks.common import machine
from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation, RequestRefused
from services.datasets import mtbench_questions
from services.embedded import embedded_stack
from worker.engine import Engine, EngineConfig
from worker.metrics import WorkerMetrics
from worker.model import load_model, resolve_model

log = logging.getLogger(__name__)

RESULTS_DIR = Path("benchmarks/results")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# -- shared with benchmarks.eager_prefill ---------------------------------------


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default). On a CPU shared with other "
        "busy processes, 1 thread is steadier: two threads stall on each other "
        "whenever one of them is descheduled",
    )


def load_engine(args: argparse.Namespace) -> Engine:
    """SmolLM2 behind the worker's default engine settings."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    args.device, args.dtype = device, dtype
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(resolve_model("smollm2"), getattr(torch, dtype), device)
    return Engine(loaded, EngineConfig(), WorkerMetrics())


def histogram_mean_ms(metrics: WorkerMetrics, name: str) -> float | None:
    registry = metrics.registry
    total = registry.get_sample_value(f"{name}_sum")
    count = registry.get_sample_value(f"{name}_count")
    return 1000.0 * total / count if total is not None and count else None


def percentiles_ms(values_s: list[float]) -> dict[str, float]:
    ms = np.array(values_s) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
        "mean": float(ms.mean()),
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Enums (engine settings) as their values; anything else odd as text.
    text = json.dumps(result, indent=2, default=lambda o: getattr(o, "value", str(o)))
    path.write_text(text + "\n")
    log.info("wrote %s", path)


# -- the benchmark ----------------------------------------------------------------


@dataclass
class Sample:
    """One interruption."""

    turn: int
    received_before: int  # reply tokens received when the interrupt was sent
    delay_ms: float  # from the last of them to the send
    heard: str  # "tokens" or "ack"
    heard_point: int
    interrupted_ms: float  # send -> Interrupted
    turn_end_ms: float  # send -> TurnEnd(INTERRUPTED)
    tokens_after: int  # TokenDeltas that arrived after the send
    last_token_after_ms: float | None  # send -> the last of them
    num_kept: int
    num_rolled_back: int
    anomalies: list[str] = field(default_factory=list)


class Inbox:
    """Reads the stream in the background and stamps each message on arrival,
    so the client can send at any moment and still know what came when."""

    def __init__(self, conversation: Conversation):
        self.queue: asyncio.Queue[tuple[float, pb.ServerMessage | None]] = (
            asyncio.Queue()
        )
        self.task = asyncio.create_task(self._read(conversation))

    async def _read(self, conversation: Conversation) -> None:
        try:
            async for message in conversation.events():
                self.queue.put_nowait((time.perf_counter(), message))
        finally:
            self.queue.put_nowait((time.perf_counter(), None))

    async def get(self) -> tuple[float, pb.ServerMessage]:
        arrived_s, message = await self.queue.get()
        if message is None:
            raise RuntimeError("the stream ended mid-benchmark")
        return arrived_s, message

    def drain(self) -> list[tuple[float, pb.ServerMessage]]:
        """Whatever has arrived so far, without waiting."""
        items = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item[1] is None:
                raise RuntimeError("the stream ended mid-benchmark")
            items.append(item)
        return items


async def interrupt_once(
    conversation: Conversation,
    inbox: Inbox,
    question: str,
    rng: random.Random,
    max_new_tokens: int,
    gaps_s: list[float],
) -> Sample | None:
    """Ask, interrupt at a random point of the reply, time the cut.

    The point is a random token count, then a random fraction of a decode step
    after that token arrived: a listener's barge-in is not in step with the
    tokens. Returns None when the reply ended before the interrupt was sent.
    """
    target = rng.randint(1, 64)
    heard_kind = rng.choice(["tokens", "ack"])
    turn = pb.UserTurn(text=question, max_new_tokens=max_new_tokens)
    await conversation.send(pb.ClientMessage(user_turn=turn))
    received = 0
    last_s: float | None = None
    turn_number = 0
    anomalies: list[str] = []

    def take(arrived_s: float, message: pb.ServerMessage) -> bool:
        """Count a message that arrived before the send; False: reply over."""
        nonlocal received, last_s, turn_number
        kind = message.WhichOneof("kind")
        if kind == "turn_end":
            return False
        if kind == "token":
            if turn_number and message.token.turn != turn_number:
                anomalies.append(f"token of turn {message.token.turn} before the send")
            if last_s is not None:
                gaps_s.append(arrived_s - last_s)
            last_s = arrived_s
            received += 1
            turn_number = message.token.turn
        return True

    while received < target:
        if not take(*await inbox.get()):
            return None
    await asyncio.sleep(rng.uniform(0.0, statistics.median(gaps_s)))
    for item in inbox.drain():
        if not take(*item):
            return None  # finished too soon: no reply left to interrupt

    heard = rng.randint(0, received)
    if heard_kind == "ack":
        await conversation.ack(heard)
    sent_s = time.perf_counter()
    await conversation.interrupt(heard_tokens=heard if heard_kind == "tokens" else None)
    tokens_after = 0
    last_token_s: float | None = None
    interrupted: pb.Interrupted | None = None
    interrupted_s = turn_end_s = 0.0
    while True:
        arrived_s, message = await inbox.get()
        kind = message.WhichOneof("kind")
        if kind == "token":
            if message.token.turn != turn_number:
                anomalies.append(f"token of turn {message.token.turn}")
            tokens_after += 1
            last_token_s = arrived_s
            if interrupted is not None:
                anomalies.append("token after Interrupted")
        elif kind == "interrupted":
            interrupted, interrupted_s = message.interrupted, arrived_s
        elif kind == "turn_end":
            reason = message.turn_end.reason
            if interrupted is None and reason != pb.END_REASON_INTERRUPTED:
                # The reply ended while the interrupt was on its way, which then
                # cuts the finished reply: no latency to measure here.
                while (await inbox.get())[1].WhichOneof("kind") != "interrupted":
                    pass
                return None
            turn_end_s = arrived_s
            if interrupted is None:
                anomalies.append("TurnEnd before Interrupted")
            if message.turn_end.reason != pb.END_REASON_INTERRUPTED:
                anomalies.append(f"TurnEnd reason {message.turn_end.reason}")
            break
    if interrupted is None:
        raise RuntimeError("the reply ended without an Interrupted event")
    if interrupted.num_kept != heard:
        anomalies.append(f"kept {interrupted.num_kept}, heard {heard}")
    for anomaly in anomalies:
        log.warning("turn %d: %s", turn_number, anomaly)
    return Sample(
        turn=turn_number,
        received_before=received,
        delay_ms=(sent_s - last_s) * 1000.0,
        heard=heard_kind,
        heard_point=heard,
        interrupted_ms=(interrupted_s - sent_s) * 1000.0,
        turn_end_ms=(turn_end_s - sent_s) * 1000.0,
        tokens_after=tokens_after,
        last_token_after_ms=(
            (last_token_s - sent_s) * 1000.0 if last_token_s is not None else None
        ),
        num_kept=interrupted.num_kept,
        num_rolled_back=interrupted.num_rolled_back,
        anomalies=anomalies,
    )


async def measure(address: str, args: argparse.Namespace) -> dict[str, Any]:
    """The interruptions against the gateway at `address`."""
    rng = random.Random(args.seed)
    questions = [q.turns[0] for q in mtbench_questions()]
    rng.shuffle(questions)
    samples: list[Sample] = []
    gaps_s: list[float] = []
    skipped = 0
    async with grpc.aio.insecure_channel(address) as channel:
        conversation = Conversation(channel)
        # Sampled replies, so that they run long and differ turn to turn.
        sampling = pb.SamplingParams(temperature=0.7, seed=args.seed)
        await conversation.open(sampling=sampling)
        inbox = Inbox(conversation)
        # Warm-up turn, not counted: the first forward passes are slow, and
        # its token gaps seed the random delay of the first interruption.
        warm_up = pb.UserTurn(text="Hello! Who are you?", max_new_tokens=16)
        await conversation.send(pb.ClientMessage(user_turn=warm_up))
        arrivals = []
        while (item := await inbox.get())[1].WhichOneof("kind") != "turn_end":
            arrivals.append(item[0])
        gaps_s.extend(b - a for a, b in itertools.pairwise(arrivals[1:]))
        index = 0
        while len(samples) < args.interruptions:
            question = questions[index % len(questions)]
            index += 1
            sample = await interrupt_once(
                conversation, inbox, question, rng, args.max_new_tokens, gaps_s
            )
            if sample is None:
                skipped += 1
                continue
            samples.append(sample)
            log.info(
                "%d/%d: Interrupted after %.1f ms (%d tokens after the send)",
                len(samples),
                args.interruptions,
                sample.interrupted_ms,
                sample.tokens_after,
            )
        # The inbox owns the reads: send the close and let it see the end.
        await conversation.send(pb.ClientMessage(close=pb.CloseSession()))
        try:
            await inbox.task
        except RequestRefused as error:  # the session is closed all the same
            log.warning("the stream ended badly after the close: %s", error)
    return {"samples": samples, "gaps_s": gaps_s, "skipped": skipped}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    engine = None if args.target else await asyncio.to_thread(load_engine, args)
    machine_before = machine()  # after load_engine has set the threads
    if engine is None:
        measured = await measure(args.target, args)
    else:
        async with embedded_stack(engine) as stack:
            measured = await measure(stack.gateway_address, args)
    elapsed_s = time.perf_counter() - started
    samples: list[Sample] = measured["samples"]
    gaps_s: list[float] = measured["gaps_s"]

    step_ms = statistics.median(gaps_s) * 1000.0
    interrupted = percentiles_ms([s.interrupted_ms / 1000.0 for s in samples])
    turn_end = percentiles_ms([s.turn_end_ms / 1000.0 for s in samples])
    after = [s.last_token_after_ms for s in samples if s.last_token_after_ms]
    worker: dict[str, float | None] = {}
    if engine is not None:
        for key, name in (
            ("inter_token_mean", "inter_token_latency_seconds"),
            ("step_mean", "step_duration_seconds"),
            ("interruption_latency_mean", "interruption_latency_seconds"),
        ):
            worker[key] = histogram_mean_ms(engine.metrics, f"sinkserve_worker_{name}")
    return {
        "benchmark": "barge_in",
        "server": args.target or "embedded (gateway + worker in this process)",
        "model": engine.loaded.name if engine else "the target's",
        "device": args.device if engine else None,
        "dtype": args.dtype if engine else None,
        "machine": machine_before,
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": {
            "interruptions": args.interruptions,
            "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "interrupt_point": "after uniform [1, 64] tokens, then uniform "
            "[0, median token gap] seconds",
            "engine": asdict(engine.config) if engine else None,
        },
        "elapsed_s": elapsed_s,
        "skipped_replies_ended_first": measured["skipped"],
        "decode_step_ms": {
            "client_token_gap_median": step_ms,
            "client_token_gap_p90": float(np.percentile(gaps_s, 90) * 1000.0),
            "worker_inter_token_mean": worker.get("inter_token_mean"),
            "worker_step_mean": worker.get("step_mean"),
        },
        "interrupted_ms": interrupted,
        "turn_end_ms": turn_end,
        "interrupted_in_steps": {
            "p50": interrupted["p50"] / step_ms,
            "p99": interrupted["p99"] / step_ms,
        },
        "worker_interruption_latency_mean_ms": worker.get("interruption_latency_mean"),
        "tokens_after_interrupt": {
            "mean": statistics.fmean(s.tokens_after for s in samples),
            "max": max(s.tokens_after for s in samples),
            "interruptions_with_any": sum(1 for s in samples if s.tokens_after),
        },
        "last_token_after_interrupt_ms": percentiles_ms([ms / 1000.0 for ms in after])
        if after
        else None,
        "anomalies": [a for s in samples for a in s.anomalies],
        "samples": [asdict(s) for s in samples],
    }


def summary(result: dict[str, Any]) -> str:
    step = result["decode_step_ms"]["client_token_gap_median"]
    cut = result["interrupted_ms"]
    end = result["turn_end_ms"]
    steps = result["interrupted_in_steps"]
    after = result["tokens_after_interrupt"]
    return (
        f"{len(result['samples'])} interruptions in {result['elapsed_s']:.0f} s "
        f"on {result['machine']['cpu']} ({result['device']}, {result['dtype']}, "
        f"{result['machine']['torch_threads']} threads), "
        f"load average {result['machine'].get('loadavg_at_start')}\n"
        f"decode step (median token gap): {step:.1f} ms\n"
        f"Interrupted: p50 {cut['p50']:.1f} ms ({steps['p50']:.2f} steps), "
        f"p99 {cut['p99']:.1f} ms ({steps['p99']:.2f} steps), "
        f"max {cut['max']:.1f} ms\n"
        f"TurnEnd:     p50 {end['p50']:.1f} ms, p99 {end['p99']:.1f} ms\n"
        f"tokens still arriving after the interrupt: mean {after['mean']:.2f}, "
        f"max {after['max']} ({after['interruptions_with_any']} interruptions)\n"
        f"anomalies: {len(result['anomalies'])}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.barge_in", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--interruptions", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=160,
        help="reply limit; long enough that most replies are still generating",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "barge_in.json")
    parser.add_argument(
        "--target", help="a running gateway host:port (default: embedded SmolLM2)"
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
