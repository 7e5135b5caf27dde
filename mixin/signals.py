"""Leaving the cluster at once when the process is asked to stop (SIGTERM, SIGINT).

Docker and systemd stop a service with SIGTERM, whose default action ends the process on the spot:
a peer would vanish only when its membership expired. So while a peer is inside ``async with``
(:class:`~mixin.agent.Agent`), the event loop catches SIGTERM and SIGINT, but only those nothing
else handles (still at their default: ``SIG_DFL``, Python's ``default_int_handler``), and only in
the main thread. A signal cancels every task inside a peer's ``async with``; each block unwinds
and its peer leaves, and the last block to end raises :class:`StopRequested`, a ``SystemExit(0)``,
for SIGTERM (a requested stop that went well, as service managers expect) or ``KeyboardInterrupt``
for SIGINT, as Python does. A second signal while leaving ends the process at once, as the default
would. The handlers go when the last peer leaves its block, restoring the defaults.

An application that handles these signals itself (``loop.add_signal_handler``, ``signal.signal``,
``asyncio.run``'s own SIGINT handling) keeps its handlers: the peer then leaves when the
application's handler ends the ``async with`` block. ``Agent(handle_signals=False)`` opts out.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading

__all__ = ["StopRequested", "Watch", "stop_error"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WATCHES: dict[asyncio.AbstractEventLoop, Watch] = {}
"""The watch of each loop that has a task inside a peer's block."""


class StopRequested(SystemExit):
    """A SIGTERM stopped the peer: it left the cluster; the process exits with status 0."""


def _is_default(sig: signal.Signals) -> bool:
    handler = signal.getsignal(sig)
    return handler is (signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


class Watch:
    """The stop signals of one event loop, caught while any task is inside a peer's block."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.installed: list[signal.Signals] = []
        self.tasks: dict[asyncio.Task[object], int] = {}
        """Tasks inside a peer's block, with how many blocks each is inside."""
        self.received: int | None = None
        """The signal that asked this process to stop, once one did."""
        self.cancelled: set[asyncio.Task[object]] = set()
        """Tasks this watch cancelled (their cancel is taken back as the block raises why)."""
        self.leaving: set[asyncio.Task[object]] = set()
        """Tasks tearing a peer's block down: a signal must not cancel their leave."""
        self.left = asyncio.Event()
        """Set each time a block ends (see :meth:`outlast`)."""

    @classmethod
    def enter(cls) -> Watch | None:
        """The current task enters a peer's block: catch the stop signals nothing else handles
        (the first block on this loop installs the handlers). None where signals cannot be caught
        (not the main thread, or a loop without signal support)."""
        task = asyncio.current_task()
        if task is None or threading.current_thread() is not threading.main_thread():
            return None
        loop = asyncio.get_running_loop()
        watch = _WATCHES.get(loop)
        if watch is None:
            watch = _WATCHES[loop] = cls(loop)
            for sig in _SIGNALS:
                if not _is_default(sig):
                    continue  # the application (or asyncio.run) handles it: leave it alone
                try:
                    loop.add_signal_handler(sig, watch._on_signal, sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    continue  # a loop without signal support
                watch.installed.append(sig)
        watch.tasks[task] = watch.tasks.get(task, 0) + 1
        return watch

    def begin_leaving(self) -> None:
        """The current task starts tearing its block down (leaving the cluster): a signal that
        comes now is remembered, not used to cancel that leave."""
        task = asyncio.current_task()
        if task is not None:
            self.leaving.add(task)

    def exit(self) -> int | None:
        """The current task leaves a peer's block; the last one out removes the handlers.

        Returns the stop signal received meanwhile when this is the last block to end (its block
        then raises what the signal asks for); else None, and a block a signal cancelled lets the
        cancellation go on, so no block ends the process while another peer is still leaving."""
        task = asyncio.current_task()
        self.leaving.discard(task)
        if task is not None and task in self.tasks:
            self.tasks[task] -= 1
            if not self.tasks[task]:
                del self.tasks[task]
            elif self.received is not None and task not in self.cancelled:
                # the signal came while this block was leaving: the blocks around it end now
                task.cancel(f"{signal.Signals(self.received).name} received: leaving the cluster")
                self.cancelled.add(task)
        self.left.set()
        if self.tasks:
            return None
        self._remove()
        if self.received is not None and task in self.cancelled:
            task.uncancel()  # the cancel was ours; what the block raises now says why
        return self.received

    async def outlast(self) -> int | None:
        """After :meth:`exit` gave None, for a task whose outermost block a stop ended (a signal
        here, or a cancellation such as ``asyncio.run``'s on Ctrl-C): wait until no other task is
        still leaving, then return the signal, if one came (the block raises what it asks for, as
        the last does). Ending at once would let an ``asyncio.gather`` over the blocks end
        ``main``, and the process, while other peers are still leaving."""
        task = asyncio.current_task()
        if task is None or task in self.tasks or (self.received is None and not task.cancelling()):
            return None
        while self.leaving - {task}:
            self.left.clear()
            await self.left.wait()
        if self.received is None:
            return None
        if task in self.cancelled:
            task.uncancel()  # the cancel was ours; what the block raises now says why
        return self.received

    def _remove(self) -> None:
        for sig in self.installed:
            with contextlib.suppress(RuntimeError, ValueError):
                self.loop.remove_signal_handler(sig)  # back to the default
        self.installed.clear()
        if _WATCHES.get(self.loop) is self:
            del _WATCHES[self.loop]

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.received is not None:  # asked twice: stop now, as the default would
            self._remove()
            signal.raise_signal(sig)
            return
        self.received = sig
        for task in list(self.tasks):
            if not task.done() and task not in self.leaving:
                task.cancel(f"{sig.name} received: leaving the cluster")
                self.cancelled.add(task)


def stop_error(sig: int) -> BaseException:
    """What a peer's block raises once it left because of signal ``sig``."""
    if sig == signal.SIGINT:
        return KeyboardInterrupt()
    return StopRequested(0)
