"""Lean RESP connections for the hot paths: the router's loop (sync :class:`RespConnection`), a
peer's requests and inbox reads, a bridge's inbox reads and deliveries (asyncio :class:`AsyncResp`).

redis-py spends about 40 us of CPU per call on this machine beyond the socket work itself (command
building, connection-pool bookkeeping, retry and observability wrappers). The router makes one
round trip per batch (its read, with the previous batch's fan-out riding along), a peer one per
publish and one per inbox read, so that overhead was most of their cost per message. These
connections pack with ``hiredis.pack_command``, parse with a ``hiredis.Reader`` and raise
redis-py's own exception types, so callers handle errors exactly as they would with redis-py
(reconnect with backoff, NOGROUP, NOPERM, NOSCRIPT). One caller at a time uses an asyncio
connection (an outbox writes one batch at a time; an inbox has one reader), so it needs no locking.
Plain ``redis://`` TCP URLs only; other URLs keep using redis-py.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import hiredis
from redis.connection import parse_url
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "AsyncResp",
    "Endpoint",
    "Entry",
    "Replies",
    "RespConnection",
    "bulk",
    "pack",
    "reply_error",
    "stream_entries",
    "stream_entries_py",
    "supports",
]

Entry = tuple[str, str, dict[str, str]]
"""(stream key, entry id, fields) of one stream entry."""


def supports(url: str | None) -> bool:
    """True for the URLs the lean connections handle (plain TCP ``redis://``)."""
    return bool(url) and str(url).startswith("redis://")


def reply_error(reply: hiredis.ReplyError) -> RedisError:
    """The redis-py exception a RESP error reply stands for."""
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    if text.startswith("NOPERM"):
        return NoPermissionError(text)
    if text.startswith(("WRONGPASS", "NOAUTH")):
        return AuthenticationError(text)
    return ResponseError(text)


class Endpoint:
    """Where a ``redis://`` URL points, and the commands that open a session there."""

    def __init__(self, url: str) -> None:
        opts = parse_url(url)  # type: ignore[no-untyped-call]
        self.host = str(opts.get("host") or "127.0.0.1")
        self.port = int(opts.get("port") or 6379)
        self.username = opts.get("username")
        self.password = opts.get("password")
        self.db = int(opts.get("db") or 0)

    def handshake(self) -> list[tuple[Any, ...]]:
        """AUTH and SELECT as the URL asks (nothing for a default, password-less database)."""
        setup: list[tuple[Any, ...]] = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username else
                         ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        return setup


class Replies:
    """RESP replies parsed off a byte stream; error replies become redis-py exceptions.

    The one reply loop of both lean connections: they feed what the socket gave and collect until
    every reply they are owed has arrived.
    """

    def __init__(self) -> None:
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")

    def feed(self, data: bytes) -> None:
        """Add bytes read from the socket."""
        self._reader.feed(data)

    def collect(self, out: list[Any], expected: int) -> bool:
        """Append complete replies to ``out`` until it holds ``expected``; False if more bytes
        are needed first."""
        while len(out) < expected:
            reply = self._reader.gets()
            if reply is False:
                return False
            out.append(reply_error(reply) if isinstance(reply, hiredis.ReplyError) else reply)
        return True


class RespConnection(Endpoint):
    """One socket to Redis; ``pipeline(commands, timeout)`` sends them all and reads every reply."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._sock: socket.socket | None = None
        self._timeout: float | None = None
        self._replies = Replies()
        self._owed = 0

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=10)
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._sock = sock
        self._timeout = 10.0
        self._replies = Replies()
        setup = self.handshake()
        for reply in self._roundtrip(setup, 10.0) if setup else []:
            if isinstance(reply, Exception):
                self.close()
                raise reply
        return sock

    def send(self, commands: list[tuple[Any, ...]]) -> None:
        """Write ``commands`` now without waiting; the next :meth:`pipeline` returns their replies
        first (Redis runs them on arrival, so the caller may do other work, or sleep, meanwhile)."""
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        try:
            self._sock.sendall(pack(commands))
        except OSError as exc:
            self.close()
            raise RedisConnectionError(f"lost the connection to Redis: {exc}") from exc
        self._owed += len(commands)

    def pipeline(self, commands: list[tuple[Any, ...]], timeout: float) -> list[Any]:
        """Send ``commands`` in one write; each reply, or the ResponseError a command got.

        Replies still owed to commands written by :meth:`send` come first.
        """
        if self._sock is None:
            self._connect()
        return self._roundtrip(commands, timeout)

    def _roundtrip(self, commands: list[tuple[Any, ...]], timeout: float) -> list[Any]:
        sock = self._sock
        assert sock is not None
        try:
            if timeout != self._timeout:  # settimeout is a syscall: only when it changes
                sock.settimeout(timeout)
                self._timeout = timeout
            if commands:
                sock.sendall(pack(commands))
            expected, self._owed = self._owed + len(commands), 0
            replies: list[Any] = []
            while not self._replies.collect(replies, expected):
                data = sock.recv(1 << 16)
                if not data:
                    self.close()
                    raise RedisConnectionError("Redis closed the connection")
                self._replies.feed(data)
            return replies
        except TimeoutError as exc:
            self.close()
            raise RedisTimeoutError(f"no answer from Redis within {timeout}s") from exc
        except OSError as exc:
            self.close()
            raise RedisConnectionError(f"lost the connection to Redis: {exc}") from exc

    def close(self) -> None:
        self._owed = 0  # replies owed on a closed connection are gone with it
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __repr__(self) -> str:
        return f"RespConnection({self.host}:{self.port}/{self.db})"


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


def pack(commands: list[tuple[Any, ...]]) -> bytes:
    """``commands`` in the Redis protocol, ready for one write."""
    return b"".join(hiredis.pack_command(c) for c in commands)


def bulk(value: str | bytes) -> bytes:
    """One argument of a command in the Redis protocol (for commands packed piece by piece)."""
    data = value if isinstance(value, bytes) else value.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def stream_entries(reply: Any) -> list[Entry]:
    """A raw RESP2 XREADGROUP reply (as the lean connections parse it: lists of field/value lists)
    as one ordered list of entries."""
    out: list[Entry] = []
    for stream, records in reply or ():
        for eid, flat in records:
            fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
            out.append((stream, eid, fields))
    return out


def stream_entries_py(reply: Any) -> list[Entry]:
    """An XREADGROUP reply as redis-py parses it (RESP2 list or RESP3 dict) as one ordered list."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    out: list[Entry] = []
    for stream, records in items:
        if records and isinstance(records[0], list) and len(records) == 1 and \
                (not records[0] or isinstance(records[0][0], list | tuple)):
            records = records[0]
        for eid, fields in records:
            out.append((str(stream), str(eid), fields or {}))
    return out
