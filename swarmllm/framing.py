"""The caller's end of one hivemind RPC stream, reading every frame with a bound on its size.

hivemind frames each protobuf of a stream as a marker byte, an 8-byte length and the message;
its own reader (``P2P.receive_raw_data``) reads whatever length the other side wrote, so a
hostile peer could make a client buffer gigabytes (and parse them on its event loop). Here the
length is checked (``protocol.check_message_size``, the check a peer applies to requests) before
one byte of the message is read, and an oversized frame ends the stream unread. Writing uses
hivemind's own framing, so the peer's side is hivemind's as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from swarmllm.protocol import (
    SERVICER_NAMESPACE,
    MalformedMessage,
    RemoteError,
    SwarmRPC,
    check_message_size,
)


class RPCStream:
    """Requests go out as ``requests`` yields them; ``read`` takes one reply frame's bytes."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
        peer_id: str,
    ):
        self._reader, self._writer, self.peer_id = reader, writer, peer_id
        self._writing = asyncio.ensure_future(self._write(requests))

    @classmethod
    async def open(
        cls,
        p2p: P2P,
        peer_id: str,
        method: str,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
    ) -> RPCStream:
        """A stream to ``SwarmRPC.{method}`` (``rpc_inference``, ``rpc_forward``) of the peer."""
        name = SwarmRPC._get_handle_name(SERVICER_NAMESPACE, method)
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), name)
        return cls(reader, writer, requests, peer_id)

    async def _write(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
        async for request in requests:
            await P2P.send_protobuf(request, self._writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, self._writer)

    async def read(self, max_bytes: int) -> bytes | None:
        """The next reply's serialized ``ExpertResponse``, or None when the peer ended the
        stream. Raises ``MessageTooLarge`` (and closes the stream) for a frame over
        ``max_bytes``, ``RemoteError`` for hivemind's error frame, ``MalformedMessage`` for a
        frame that is neither."""
        try:
            marker = await self._reader.readexactly(1)
            header = await self._reader.readexactly(P2P.HEADER_LEN)
        except asyncio.IncompleteReadError:
            return None
        length = int.from_bytes(header, P2P.BYTEORDER)
        if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
            self.close()
            raise MalformedMessage(f"reply frame has an unknown marker {marker!r}")
        try:
            check_message_size(length, max_bytes, "reply")
        except MalformedMessage:
            self.close()  # the rest of the frame is never read
            raise
        try:
            data = await self._reader.readexactly(length)
        except asyncio.IncompleteReadError:
            return None
        if marker == P2P.ERROR_MARKER:  # hivemind's report of a handler that raised
            error = RPCError()
            with contextlib.suppress(Exception):
                error.ParseFromString(data)
            raise RemoteError(f"the peer's handler failed: {error.message}", peer_id=self.peer_id)
        return data

    def close(self) -> None:
        if self._writing.done() and not self._writing.cancelled():
            self._writing.exception()  # a write error is the read's to report: seen here
        self._writing.cancel()
        with contextlib.suppress(Exception):
            self._writer.close()

    async def aclose(self) -> None:
        """Close after the requests written so far have gone out (at most a second)."""
        await asyncio.wait({self._writing}, timeout=1.0)  # never raises, even if it failed
        self.close()
