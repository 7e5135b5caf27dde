"""How a peer's ``async with`` treats SIGTERM and SIGINT (mixin.signals), with a bare Agent: the
handlers exist only while a block runs and only where nothing else handles the signal; a signal
tears every peer down, then ends the process (with a clean exit for SIGTERM)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest

from mixin import Agent
from mixin.signals import StopRequested
from tests.support import ROOT, async_wait_for


class Recorded(Agent):
    """An Agent that records its lifecycle calls."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(namespace="signals", **kwargs)
        self.calls: list[str] = []

    async def setup(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("setup")

    async def teardown(self) -> None:
        self.calls.append("teardown")


def caught(sig: signal.Signals) -> bool:
    return signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler)


async def test_the_handlers_live_only_while_a_block_runs() -> None:
    # pytest-asyncio runs the test as asyncio.run does, whose SIGINT handler is to be left alone
    sigint = signal.getsignal(signal.SIGINT)
    peer = Recorded()
    assert not caught(signal.SIGTERM)
    async with peer, Recorded():  # two peers, one set of handlers
        assert caught(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is sigint
    assert not caught(signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is sigint
    assert peer.calls == ["setup", "teardown"]


async def test_sigterm_tears_the_peers_down_and_ends_the_block_with_a_clean_exit() -> None:
    outer, inner = Recorded(), Recorded()
    task = asyncio.current_task()
    assert task is not None
    reached_end = False
    with pytest.raises(StopRequested) as raised:
        async with outer, inner:
            signal.raise_signal(signal.SIGTERM)
            await asyncio.Event().wait()
            reached_end = True
    assert not reached_end
    assert outer.calls == inner.calls == ["setup", "teardown"]
    assert isinstance(raised.value, SystemExit) and raised.value.code == 0
    assert task.cancelling() == 0  # the cancel that ended the block was taken back
    assert not caught(signal.SIGTERM)


# Peers in several tasks, and SIGINT where no asyncio.run handles it, end the process: run apart.
TWO_TASKS = """
import asyncio, os, signal, sys
from mixin import Agent

class Peer(Agent):
    async def teardown(self):
        # a leave takes a round trip, p1's longer: p0's block ends while p1 is still leaving
        await asyncio.sleep(0.05 if self.id == "p0" else 0.3)
        print("left", self.id, flush=True)

async def block(peer, entered):
    async with peer:
        entered.set()
        await asyncio.Event().wait()

async def main():
    events = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(block(Peer(id=f"p{n}"), e)) for n, e in enumerate(events)]
    for e in events:
        await e.wait()
    signal.raise_signal(getattr(signal, sys.argv[1]))
    await asyncio.gather(*tasks)
    print("not reached", flush=True)

if sys.argv[2] == "asyncio.run":
    asyncio.run(main())
else:
    asyncio.new_event_loop().run_until_complete(main())
"""


@pytest.mark.parametrize(("sig", "runner", "status"), [
    ("SIGTERM", "asyncio.run", 0),
    ("SIGINT", "asyncio.run", -signal.SIGINT),  # asyncio.run's own handling, then Python's
    ("SIGINT", "run_until_complete", -signal.SIGINT),  # ours, then Python's
])
def test_every_peer_of_the_process_leaves_before_it_ends(sig: str, runner: str, status: int) -> None:
    done = subprocess.run([sys.executable, "-c", TWO_TASKS, sig, runner], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert sorted(done.stdout.split("\n")) == ["", "left p0", "left p1"], done.stdout + done.stderr
    assert done.returncode == status, done.stderr


async def test_an_applications_own_handler_is_left_alone() -> None:
    loop = asyncio.get_running_loop()
    heard: list[str] = []
    loop.add_signal_handler(signal.SIGTERM, heard.append, "app")
    try:
        async with Recorded() as peer:
            signal.raise_signal(signal.SIGTERM)
            await async_wait_for(lambda: heard, what="the application's handler")
            assert peer.calls == ["setup"]  # the block goes on: the application decides
        assert peer.calls == ["setup", "teardown"]
        assert caught(signal.SIGTERM)  # still the application's
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def test_opting_out_installs_nothing() -> None:
    async with Recorded(handle_signals=False):
        assert not caught(signal.SIGTERM)


def test_a_peer_in_another_thread_leaves_the_signals_alone() -> None:
    seen: list[bool] = []

    async def block() -> None:
        async with Recorded():
            seen.append(caught(signal.SIGTERM))

    thread = threading.Thread(target=asyncio.run, args=(block(),))
    thread.start()
    thread.join(10)
    assert seen == [False]


async def test_a_failed_setup_is_torn_down_and_its_error_goes_on() -> None:
    class Failing(Recorded):
        async def setup(self, *args: Any, **kwargs: Any) -> None:
            await super().setup()
            raise RuntimeError("no")

    peer = Failing()
    with pytest.raises(RuntimeError, match="no"):
        async with peer:
            pytest.fail("entered")
    assert peer.calls == ["setup", "teardown"]
    assert not caught(signal.SIGTERM)  # the handlers went with the failed block


class SlowLeave(Recorded):
    """A peer whose leave takes a round trip, during which the stop signal comes."""

    async def teardown(self) -> None:
        self.calls.append("leaving")
        assert caught(signal.SIGTERM)  # else the signal would end the test run itself
        signal.raise_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)  # the leave's round trip: the signal is handled meanwhile
        self.calls.append("left")


async def test_a_signal_that_comes_while_a_peer_leaves_does_not_cut_its_leave_short() -> None:
    peer = SlowLeave()
    with pytest.raises(StopRequested):  # the signal still ends the block, once the leave is done
        async with peer:
            pass
    assert peer.calls == ["setup", "leaving", "left"]
    assert not caught(signal.SIGTERM)
