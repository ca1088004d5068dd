"""The examples run against a real stack, so they cannot silently rot."""

from __future__ import annotations

import io

import pytest

from examples import barge_in_client
from services.embedded import embedded_stack
from worker.engine import Engine, EngineConfig


@pytest.mark.parametrize("heard", ["ack", "tokens"])
@pytest.mark.parametrize("seed", [0, 5])
async def test_barge_in_client_cuts_the_reply_where_it_stopped_playing(
    tiny, heard: str, seed: int
) -> None:
    loaded, _ = tiny
    args = barge_in_client.build_parser().parse_args(
        ["--tokens-per-s", "400", "--seed", str(seed), "--heard", heard]
        + ["--reply-tokens", "40"]
    )
    out = io.StringIO()
    async with embedded_stack(Engine(loaded, EngineConfig())) as stack:
        cut = await barge_in_client.talk(stack.gateway_address, args, out)
        # The session is closed and the engine idle: nothing leaked.
        assert not stack.engine.sessions
    text = out.getvalue()
    # Whatever the random tiny model says, the cut keeps exactly what was
    # played: the reply text printed before the barge-in marker.
    played = text.split("bot> ", 1)[1].split(" <barge-in", 1)[0]
    assert cut.turn == 1
    assert cut.text == played
    assert f"{cut.num_kept} tokens played" in text
    assert not cut.clamped and cut.num_lost == 0
    assert "interrupted: kept" in text
    assert text.rstrip().count("bot> ") == 2
