"""A small async client for one session over the gateway's stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from protos.sinkserve.v1 import sinkserve_pb2_grpc as pb_grpc


class RequestRefused(Exception):
    """The server refused a request, in-stream or by ending the stream."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


class Conversation:
    """One session on one stream: open or resume, then ask turn after turn."""

    def __init__(self, channel: grpc.aio.Channel):
        self._stub = pb_grpc.SessionsStub(channel)
        self._call: grpc.aio.StreamStreamCall | None = None
        self.opened: pb.SessionOpened | None = None

    @property
    def session_id(self) -> str:
        if self.opened is None:
            raise RuntimeError("the conversation is not open")
        return self.opened.session_id

    async def open(
        self,
        system_prompt: str | None = None,
        sampling: pb.SamplingParams | None = None,
        sink_size: int | None = None,
        window_size: int = 0,
        eviction: int = pb.EVICTION_UNSPECIFIED,
    ) -> pb.SessionOpened:
        cache = pb.CacheSettings(window_size=window_size, eviction=eviction)
        if sink_size is not None:
            cache.sink_size = sink_size
        message = pb.OpenSession(sampling=sampling or pb.SamplingParams(), cache=cache)
        if system_prompt is not None:
            message.system_prompt = system_prompt
        return await self._start(pb.ClientMessage(open=message))

    async def resume(self, session_id: str) -> pb.SessionOpened:
        resume = pb.ResumeSession(session_id=session_id)
        return await self._start(pb.ClientMessage(resume=resume))

    async def _start(self, first: pb.ClientMessage) -> pb.SessionOpened:
        self._call = self._stub.Converse()
        await self._call.write(first)
        reply = await self._read()
        if reply.WhichOneof("kind") != "opened":
            raise RuntimeError(
                f"expected SessionOpened, got {reply.WhichOneof('kind')}"
            )
        self.opened = reply.opened
        return reply.opened

    async def send(self, message: pb.ClientMessage) -> None:
        if self._call is None:
            raise RuntimeError("the conversation is not open")
        await self._call.write(message)

    async def ask(
        self, text: str, max_new_tokens: int = 0
    ) -> AsyncIterator[pb.ServerMessage]:
        """Send a user turn; yield its tokens and evictions, then its TurnEnd."""
        turn = pb.UserTurn(text=text, max_new_tokens=max_new_tokens)
        await self.send(pb.ClientMessage(user_turn=turn))
        async for message in self.reply():
            yield message

    async def reply(self) -> AsyncIterator[pb.ServerMessage]:
        """Server messages up to and including the next TurnEnd."""
        async for message in self.events():
            yield message
            if message.WhichOneof("kind") == "turn_end":
                return

    async def events(self) -> AsyncIterator[pb.ServerMessage]:
        """Server messages until the stream ends; in-stream errors raise."""
        while True:
            message = await self._read()
            if message is None:
                return
            if message.WhichOneof("kind") == "error":
                raise RequestRefused(
                    _status_code(message.error.code), message.error.message
                )
            yield message

    async def interrupt(
        self, heard_tokens: int | None = None, heard_chars: int | None = None
    ) -> None:
        """Barge in: the listener heard this much of the newest reply."""
        message = pb.Interrupt()
        if heard_tokens is not None:
            message.heard_tokens = heard_tokens
        elif heard_chars is not None:
            message.heard_chars = heard_chars
        await self.send(pb.ClientMessage(interrupt=message))

    async def ack(self, played_tokens: int) -> None:
        await self.send(pb.ClientMessage(ack=pb.Ack(played_tokens=played_tokens)))

    async def close(self) -> None:
        """Close the session on the server (its cache is freed), then the stream."""
        if self._call is None:
            return
        await self.send(pb.ClientMessage(close=pb.CloseSession()))
        async for _ in self.events():
            pass
        self._call = None

    async def detach(self) -> None:
        """End this stream; the session lives on and can be resumed."""
        if self._call is not None:
            await self._call.done_writing()
            async for _ in self.events():
                pass
            self._call = None

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def _read(self) -> pb.ServerMessage | None:
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise RequestRefused(error.code(), error.details() or "") from error
        return None if message is grpc.aio.EOF else message
