"""Barge-in from the client's side: play a reply aloud, then talk over it.

The server generates faster than anyone speaks, so a voice client buffers the
reply and plays it on a timer. It acknowledges each played token (`Ack`); when
the user speaks up it sends `Interrupt` and, in the same batch of writes, the
user's next turn. The server cuts the reply back to what was heard, says so in
an `Interrupted` event, and answers the new turn, which follows the cut.

    python examples/barge_in_client.py                    # embedded SmolLM2
    python examples/barge_in_client.py --target localhost:50051 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from typing import TextIO

import grpc

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from services.client import Conversation, RequestRefused


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", help="gateway host:port (default: embedded)")
    parser.add_argument("--tokens-per-s", type=float, default=4.0, help="play speed")
    parser.add_argument("--seed", type=int, default=0, help="when and how to barge in")
    parser.add_argument(
        "--heard",
        choices=["ack", "tokens", "random"],
        default="random",
        help="ack: Interrupt without a heard point (the last Ack counts); "
        "tokens: Interrupt(heard_tokens=played)",
    )
    parser.add_argument("--reply-tokens", type=int, default=96)
    parser.add_argument("--question", default="Tell me the story of the Titanic.")
    parser.add_argument("--follow-up", default="Sorry, how many people survived?")
    return parser


class Player:
    """Receives a turn's reply in the background and plays it on a timer."""

    def __init__(self, conversation: Conversation, out: TextIO, tokens_per_s: float):
        self.conversation = conversation
        self.out = out
        self.tick_s = 1.0 / tokens_per_s
        self.inbox: asyncio.Queue[pb.ServerMessage | Exception] = asyncio.Queue()

    async def receive(self) -> None:
        try:
            async for message in self.conversation.events():
                self.inbox.put_nowait(message)
        except RequestRefused as error:  # raise it where someone is waiting
            self.inbox.put_nowait(error)

    async def get(self) -> pb.ServerMessage:
        item = await self.inbox.get()
        if isinstance(item, Exception):
            raise item
        return item

    async def play(self, turn: int, stop_after: int | None = None) -> int:
        """Play `turn`'s reply, acking each token, until it ends or `stop_after`
        tokens are played. Returns the tokens played."""
        reply: list[pb.TokenDelta] = []
        ended = False
        played = 0
        due = time.monotonic()
        while stop_after is None or played < stop_after:
            # Wait for the next token only when none is buffered (playback stalls).
            while not self.inbox.empty() or (played == len(reply) and not ended):
                message = await self.get()
                kind = message.WhichOneof("kind")
                if kind == "token" and message.token.turn == turn:
                    reply.append(message.token)
                elif kind == "turn_end" and message.turn_end.turn == turn:
                    ended = True
            if played == len(reply):
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            due = max(due, time.monotonic()) + self.tick_s
            self.out.write(reply[played].text)
            self.out.flush()
            played += 1
            await self.conversation.ack(played)
        return played

    async def next_of(self, kind: str) -> pb.ServerMessage:
        """Skip to the next message of `kind`, e.g. past tokens nobody will play."""
        while (message := await self.get()).WhichOneof("kind") != kind:
            pass
        return message


async def talk(address: str, args: argparse.Namespace, out: TextIO) -> pb.Interrupted:
    """One turn, a barge-in at a random point, the follow-up turn."""
    rng = random.Random(args.seed)
    barge_at = rng.randint(3, 24)  # tokens the user hears before speaking up
    heard = args.heard if args.heard != "random" else rng.choice(["ack", "tokens"])
    async with grpc.aio.insecure_channel(address) as channel:
        conversation = Conversation(channel)
        sampling = pb.SamplingParams(
            temperature=0.7, max_new_tokens=args.reply_tokens, seed=args.seed
        )
        opened = await conversation.open(sampling=sampling)
        out.write(f"session {opened.session_id[:8]}, playing at ")
        out.write(f"{args.tokens_per_s:g} tokens/s\n\nyou> {args.question}\nbot> ")
        player = Player(conversation, out, args.tokens_per_s)
        receiver = asyncio.create_task(player.receive())
        await conversation.send(
            pb.ClientMessage(user_turn=pb.UserTurn(text=args.question))
        )
        played = await player.play(turn=1, stop_after=barge_at)

        # The user speaks up: interrupt and send the new turn back to back.
        if heard == "ack":
            await conversation.interrupt()  # the heard point is the last Ack
        else:
            await conversation.interrupt(heard_tokens=played)
        follow_up = pb.UserTurn(text=args.follow_up)
        await conversation.send(pb.ClientMessage(user_turn=follow_up))
        # A reply played to its end is interrupted all the same: nothing is cut.
        when = " after the whole reply" if played < barge_at else ""
        point = "the last Ack" if heard == "ack" else f"heard_tokens={played}"
        out.write(f" <barge-in{when}: {played} tokens played; heard point {point}>")
        out.write(f"\nyou> {args.follow_up}\n")

        cut = (await player.next_of("interrupted")).interrupted
        note = f"; {cut.warning}" if cut.warning else ""
        out.write(
            f"[turn {cut.turn} interrupted: kept {cut.num_kept} tokens, rolled back "
            f"{cut.num_rolled_back}, lost {cut.num_lost}{note}]\n"
            f"[the session now holds: {cut.text!r}]\nbot> "
        )
        await player.play(turn=cut.turn + 1)
        out.write("\n")
        # The receiver owns the stream's reads: send the close and let it see
        # the stream end (cancelling a pending read would cancel the call).
        await conversation.send(pb.ClientMessage(close=pb.CloseSession()))
        await receiver
        return cut


async def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.target:
        await talk(args.target, args, sys.stdout)
        return
    from services.embedded import embedded_stack
    from worker.engine import Engine, EngineConfig
    from worker.model import load_model, resolve_model

    loaded = await asyncio.to_thread(load_model, resolve_model("smollm2"))
    async with embedded_stack(Engine(loaded, EngineConfig())) as stack:
        await talk(stack.gateway_address, args, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
