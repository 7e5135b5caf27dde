"""A lean asyncio RESP connection for a peer's two hot paths: writing requests, reading its inbox.

redis-py's asyncio client costs tens of microseconds of CPU per call beyond the socket work, and a
peer makes one call per publish and one per inbox read. This connection packs commands with
``hiredis.pack_command`` and parses replies with a ``hiredis.Reader``; it raises redis-py's own
exception types, so the callers' error handling (reconnect with backoff, NOGROUP, NOPERM) is the
same as with redis-py. One caller at a time uses a connection (the outbox writes one batch at a
time; the inbox has one reader), so it needs no locking. Plain ``redis://`` TCP URLs only; other
URLs keep using redis-py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from coordinator.resp import Endpoint, Replies, pack, supports

__all__ = ["AsyncResp", "supports"]


class AsyncResp(Endpoint):
    """One asyncio connection; ``pipeline(commands)`` sends them in one write, returns every reply."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._replies = Replies()

    async def _connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._replies = Replies()
        setup = self.handshake()
        if setup:
            for reply in await self._exchange(pack(setup), len(setup)):
                if isinstance(reply, Exception):
                    await self.close()
                    raise reply

    async def pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Each command's reply, or the ResponseError that command got (raised for nothing)."""
        if self._writer is None:
            await self._connect()
        return await self._exchange(pack(commands), len(commands))

    async def send_packed(self, data: bytes, count: int) -> list[Any]:
        """As :meth:`pipeline` for ``count`` commands already packed into ``data``."""
        if self._writer is None:
            await self._connect()
        return await self._exchange(data, count)

    async def call(self, *command: Any) -> Any:
        """One command; raises its error."""
        (reply,) = await self.pipeline([command])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _exchange(self, data: bytes, count: int) -> list[Any]:
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        try:
            writer.write(data)
            replies: list[Any] = []
            while not self._replies.collect(replies, count):
                data = await reader.read(1 << 16)
                if not data:
                    raise ConnectionResetError("Redis closed the connection")
                self._replies.feed(data)
            return replies
        except asyncio.CancelledError:
            await self.close()  # a reply may be half read: never reuse this connection
            raise
        except OSError as exc:
            await self.close()
            raise RedisConnectionError(f"lost the connection to Redis: {exc}") from exc

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"AsyncResp({self.host}:{self.port}/{self.db})"
