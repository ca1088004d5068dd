"""Client-side conversations for the CLI: MT-Bench replay and interactive chat.

Tokens print as they arrive; after each turn one line of turn stats follows.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TextIO

import grpc

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation

_REASONS = {
    pb.END_REASON_STOP: "stop",
    pb.END_REASON_LENGTH: "length",
    pb.END_REASON_CANCELLED: "cancelled",
    pb.END_REASON_ERROR: "error",
}


@dataclass
class TurnRecord:
    question: str
    reply: str
    end: pb.TurnEnd
    evictions: list[pb.EvictionNotice] = field(default_factory=list)


def stats_line(
    end: pb.TurnEnd, evictions: list[pb.EvictionNotice], cache_size: int
) -> str:
    s = end.stats
    gone = sorted({t for e in evictions for t in e.turns_gone})
    partial = [e.turn_partial for e in evictions if e.turn_partial]
    line = (
        f"[turn {end.turn} | prefilled {s.num_prefilled} | reused {s.num_reused} | "
        f"evicted {s.num_evicted} in {len(evictions)} events | "
        f"ttft {s.ttft_ms:.0f} ms | decode {s.decode_tokens_per_s:.1f} tok/s | "
        f"cache {s.cache_length}/{cache_size} | {_REASONS.get(end.reason, '?')}]"
    )
    if gone or partial:
        turns = ", ".join(map(str, gone)) or "none"
        line += f"\n[evicted: turns gone {turns}"
        line += f"; turn {partial[-1]} partly]" if partial else "]"
    return line


async def run_turn(
    conversation: Conversation, text: str, out: TextIO, max_new_tokens: int = 0
) -> TurnRecord:
    """Ask one question, printing the reply as it streams, then its stats."""
    evictions = []
    pieces = []
    end = None
    async for message in conversation.ask(text, max_new_tokens):
        kind = message.WhichOneof("kind")
        if kind == "token":
            pieces.append(message.token.text)
            out.write(message.token.text)
            out.flush()
        elif kind == "eviction":
            evictions.append(message.eviction)
        elif kind == "turn_end":
            end = message.turn_end
    opened = conversation.opened
    out.write(
        "\n" + stats_line(end, evictions, opened.sink_size + opened.window_size) + "\n"
    )
    out.flush()
    return TurnRecord(text, "".join(pieces), end, evictions)


async def replay(
    address: str,
    questions: Iterable[tuple[str, str]],
    open_kwargs: dict,
    final_questions: list[str],
    out: TextIO = sys.stdout,
    max_new_tokens: int = 0,
) -> list[TurnRecord]:
    """Stream every turn of every question through one session, in order.

    `questions` yields (label, text) pairs; `final_questions` follow in the
    same session.
    """
    records = []
    async with grpc.aio.insecure_channel(address) as channel:
        conversation = Conversation(channel)
        opened = await conversation.open(**open_kwargs)
        out.write(
            f"session {opened.session_id} on worker {opened.worker_id}: cache "
            f"{opened.sink_size} sinks + {opened.window_size} window, "
            f"{opened.num_system_tokens} system tokens pinned\n"
        )
        labelled = [
            *questions,
            *((f"final {i + 1}", q) for i, q in enumerate(final_questions)),
        ]
        for label, text in labelled:
            out.write(f"\n### {label}\n> {text}\n\n")
            records.append(await run_turn(conversation, text, out, max_new_tokens))
        await conversation.close()
    return records


def summary(records: list[TurnRecord]) -> str:
    turns = len(records)
    evicted = sum(r.end.stats.num_evicted for r in records)
    events = sum(len(r.evictions) for r in records)
    prefilled = sum(r.end.stats.num_prefilled for r in records)
    reused = sum(r.end.stats.num_reused for r in records)
    ttft = sorted(r.end.stats.ttft_ms for r in records)
    rates = [
        r.end.stats.decode_tokens_per_s
        for r in records
        if r.end.stats.decode_tokens_per_s
    ]
    return (
        f"{turns} turns | prefilled {prefilled} | reused {reused} | evicted {evicted} "
        f"tokens in {events} events | median ttft {ttft[len(ttft) // 2]:.0f} ms | "
        f"mean decode {sum(rates) / max(len(rates), 1):.1f} tok/s"
    )


async def chat(
    address: str,
    open_kwargs: dict,
    read_line: Callable[[str], Awaitable[str]],
    out: TextIO = sys.stdout,
) -> None:
    """An interactive session: one line a turn; /quit or EOF ends it."""
    async with grpc.aio.insecure_channel(address) as channel:
        conversation = Conversation(channel)
        opened = await conversation.open(**open_kwargs)
        out.write(f"session {opened.session_id} (type /quit to leave)\n")
        while True:
            try:
                text = await read_line("you> ")
            except EOFError:
                break
            if text.strip() in ("/quit", "/exit"):
                break
            if not text.strip():
                continue
            out.write("bot> ")
            await run_turn(conversation, text, out)
        await conversation.close()
