"""Federation figures: two sites (a Redis and a worker each) joined by one NATS JetStream server.

Anchors, measured on the same NATS server in the same run:

- ``raw_nats``: a nats-py publisher that awaits a flush (a server round trip) after every publish,
  the way the bridge awaits JetStream, to a plain subscriber in another process; throughput, and
  one-way latency paced like the route's latency runs.
- ``raw_jetstream``: a nats-py publisher awaiting JetStream acknowledgements in batches of 256 and a
  pull consumer fetching and acknowledging batches of 256 in another process: what a user would
  write to move messages through JetStream quickly.
- ``raw_jetstream_paced`` (context, in no target): publishes paced like the route's latency runs,
  stored in a stream and pushed to a durable consumer, as the bridges send and read; one-way
  latency.

Measured:

- ``cross_site``: the route run's publisher (awaiting each ``cluster_publish``) on site A and its
  subscriber on site B; throughput, and latency paced like the route's latency runs.
- ``catch_up``: site B's bridge stops; 50,000 messages are published on site A; the bridge starts
  again and the figure is those messages over the time from its taking the bridge lease (the
  process is up) until B's subscriber has handled them all.
- ``cross_site_failover``: two eligible peers per site; SIGKILL of the namespace's leader; the time
  until every survivor on both sites saw a new leader with a higher term (default timings).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from bench.children import Channel, Role, pace, run_stages
from bench.route import PeerParams, route_publisher, route_subscriber
from coordinator.keys import Keys
from ops.embedded import NatsServer, RedisServer

__all__ = ["Sites", "run_catch_up", "run_cross_site", "run_cross_site_failover", "run_raw_jetstream",
           "run_raw_jetstream_paced", "run_raw_nats"]

ROOT = Path(__file__).resolve().parent.parent
SITES = ("a", "b")


class Sites:
    """NATS with JetStream, and per site a Redis; workers are started per namespace."""

    def __init__(self) -> None:
        self.nats = NatsServer()
        self.redis = {site: RedisServer() for site in SITES}
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-bench-sites-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def nats_url(self) -> str:
        return self.nats.url

    def url(self, site: str) -> str:
        return self.redis[site].url

    def env(self, site: str, namespace: str, *, nats: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env.update(SIDECAR_REDIS_URL=self.url(site), SIDECAR_NAMESPACE=namespace, SIDECAR_SITE=site,
                   PYTHONUNBUFFERED="1")
        if nats:
            env["SIDECAR_NATS_URL"] = self.nats_url
        return env

    def spawn(self, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        with open(self.dir / f"p{len(self.procs)}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def worker(self, site: str, namespace: str, *, nats: bool = True) -> subprocess.Popen[bytes]:
        """A worker of ``site`` for ``namespace`` (router, and the bridge unless ``nats`` is off)."""
        return self.spawn(self.env(site, namespace, nats=nats), "-m", "celery", "-A", "workers",
                          "worker", "-P", "solo", "-l", "warning", "--without-mingle",
                          "--without-gossip", "-n", f"bench-{site}-{uuid.uuid4().hex[:4]}@%h")

    def wait_federated(self, namespace: str, timeout: float, sites: tuple[str, ...] = SITES) -> None:
        """Until every site of ``sites`` has an active bridge consuming the stream."""
        asyncio.run(_wait_consumers(self.nats_url, Keys(namespace), sites, timeout))
        for site in sites:
            client = redis.Redis.from_url(self.url(site), decode_responses=True)
            try:
                _until(lambda c=client: c.exists(Keys(namespace).router_lease(0)), timeout,
                       f"site {site}'s router")
            finally:
                client.close()

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_procs(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM)
        self.procs.clear()

    def __enter__(self) -> Sites:
        self.nats.start()
        for server in self.redis.values():
            server.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_procs()
        for server in self.redis.values():
            server.stop()
        self.nats.stop()


def _until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


async def _wait_consumers(url: str, keys: Keys, sites: tuple[str, ...], timeout: float) -> None:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        for site in sites:
            while True:
                try:
                    await js.consumer_info(keys.stream_name, keys.durable(site))
                    break
                except NotFoundError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"site {site}'s bridge never consumed the stream") from None
                    await asyncio.sleep(0.05)
    finally:
        await nc.close()


# ---------------------------------------------------------------------- raw NATS anchors
@dataclass(frozen=True)
class NatsParams:
    url: str
    subject: str
    count: int
    rate: float | None = None
    batch: int = 256
    stream: str = ""
    timeout: float = 60.0


async def nats_subscriber(channel: Channel, p: NatsParams) -> dict[str, Any]:
    """Count ``count`` messages on ``subject``; keep one-way latencies when paced."""
    import nats

    nc = await nats.connect(p.url)
    done = asyncio.Event()
    latency: list[int] = []
    got = [0, 0]

    async def on(msg: Any) -> None:
        now = time.monotonic_ns()
        if p.rate:
            latency.append(now - int(json.loads(msg.data)["t"]))
        got[0] += 1
        if got[0] == p.count:
            got[1] = now
            done.set()

    await nc.subscribe(p.subject, cb=on)
    await nc.flush()
    await _ready_until(channel, done, nc, p.timeout)
    return {"last_ns": got[1], "latency_ns": latency}


async def _ready_until(channel: Channel, done: asyncio.Event, nc: Any, timeout: float) -> None:
    """Tell the runner this role is ready, wait until ``done`` (at most ``timeout``), close."""
    channel.ready()
    try:
        async with asyncio.timeout(timeout):
            await done.wait()
    finally:
        await nc.close()


async def nats_publisher(channel: Channel, p: NatsParams) -> dict[str, Any]:
    """Publish ``count`` messages, awaiting a flush (a server round trip) after each."""
    import nats

    nc = await nats.connect(p.url)
    channel.ready()
    await channel.wait_go(p.timeout)
    start = time.monotonic_ns()
    try:
        for i in range(p.count):
            if p.rate:
                await pace(start, i, p.rate)
            await nc.publish(p.subject, json.dumps({"i": i, "t": time.monotonic_ns()}).encode())
            await nc.flush()
    finally:
        await nc.close()
    return {"start_ns": start}


def run_raw_nats(url: str, count: int, *, rate: float | None = None,
                 timeout: float = 60.0) -> dict[str, Any]:
    """The raw NATS hop: ``msgs_per_s`` (and ``latency_ns`` when paced at ``rate``)."""
    p = NatsParams(url, f"bench.raw.{uuid.uuid4().hex[:8]}", count, rate=rate, timeout=timeout)
    res = run_stages("raw-nats", [[Role("sub", nats_subscriber, p)], [Role("pub", nats_publisher, p)]],
                     timeout + 30)
    seconds = (res["sub"]["last_ns"] - res["pub"]["start_ns"]) / 1e9
    return {"msgs_per_s": count / seconds, "latency_ns": res["sub"]["latency_ns"],
            "cpu_us_per_msg": {"publisher": res["pub"]["cpu_s"] * 1e6 / count,
                               "subscriber": res["sub"]["cpu_s"] * 1e6 / count}}


async def js_consumer(channel: Channel, p: NatsParams) -> dict[str, Any]:
    """Pull ``count`` messages from ``stream`` in batches, acknowledging each batch at once."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(p.url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(p.subject, durable="bench", stream=p.stream,
                                  config=ConsumerConfig(ack_policy=AckPolicy.ALL,
                                                        max_ack_pending=p.batch * 4))
    channel.ready()
    got, last = 0, 0
    deadline = time.monotonic() + p.timeout
    try:
        while got < p.count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumed {got} of {p.count}")
            try:
                msgs = await sub.fetch(p.batch, timeout=1.0)
            except TimeoutError:
                continue
            got += len(msgs)
            await msgs[-1].ack()
        last = time.monotonic_ns()
    finally:
        await nc.close()
    return {"last_ns": last}


async def js_publisher(channel: Channel, p: NatsParams) -> dict[str, Any]:
    """Publish ``count`` messages to JetStream, awaiting the acknowledgements of each batch."""
    import nats

    nc = await nats.connect(p.url)
    js = nc.jetstream()
    channel.ready()
    await channel.wait_go(p.timeout)
    start = time.monotonic_ns()
    try:
        for first in range(0, p.count, p.batch):
            futures = [await js.publish_async(p.subject, json.dumps({"i": i}).encode(),
                                              headers={"Nats-Msg-Id": f"{start}-{i}"})
                       for i in range(first, min(p.count, first + p.batch))]
            await asyncio.gather(*futures)
    finally:
        await nc.close()
    return {"start_ns": start}


async def js_push_consumer(channel: Channel, p: NatsParams) -> dict[str, Any]:
    """Take ``count`` messages from ``stream`` as a bridge does (a durable push consumer),
    acknowledging each; one-way latencies from the publisher's clock."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(p.url)
    js = nc.jetstream()
    done = asyncio.Event()
    latency: list[int] = []

    async def on(msg: Any) -> None:
        latency.append(time.monotonic_ns() - int(json.loads(msg.data)["t"]))
        await msg.ack()
        if len(latency) == p.count:
            done.set()

    await js.subscribe(p.subject, durable="bench", stream=p.stream, cb=on, manual_ack=True,
                       config=ConsumerConfig(ack_policy=AckPolicy.ALL,
                                             max_ack_pending=p.batch * 4))
    await _ready_until(channel, done, nc, p.timeout)
    return {"latency_ns": latency}


async def js_paced_publisher(channel: Channel, p: NatsParams) -> dict[str, Any]:
    """Publish ``count`` messages to JetStream at ``rate``, not waiting for an acknowledgement
    before the next (as the bridge sends), all of them awaited at the end."""
    import nats

    nc = await nats.connect(p.url)
    js = nc.jetstream()
    channel.ready()
    await channel.wait_go(p.timeout)
    start = time.monotonic_ns()
    futures = []
    try:
        for i in range(p.count):
            await pace(start, i, p.rate or 1000.0)
            futures.append(await js.publish_async(
                p.subject, json.dumps({"i": i, "t": time.monotonic_ns()}).encode(),
                headers={"Nats-Msg-Id": f"{start}-{i}"}))
        await asyncio.gather(*futures)
    finally:
        await nc.close()
    return {"start_ns": start}


def run_raw_jetstream_paced(url: str, count: int, *, rate: float,
                            timeout: float = 60.0) -> dict[str, Any]:
    """The JetStream hop's one-way latency (``latency_ns``), paced at ``rate``: what storing a
    message before delivering it costs over core NATS (the cross-site figures' context)."""
    name = f"BENCH_{uuid.uuid4().hex[:8]}"
    asyncio.run(_stream(url, name, add=True))
    try:
        p = NatsParams(url, f"{name}.x", count, rate=rate, stream=name, timeout=timeout)
        res = run_stages("raw-jetstream-paced", [[Role("sub", js_push_consumer, p)],
                                                 [Role("pub", js_paced_publisher, p)]], timeout + 30)
    finally:
        asyncio.run(_stream(url, name, add=False))
    return {"latency_ns": res["sub"]["latency_ns"]}


def run_raw_jetstream(url: str, count: int, *, batch: int = 256,
                      timeout: float = 60.0) -> dict[str, Any]:
    """JetStream with batched acknowledgements both ways: ``msgs_per_s``."""
    name = f"BENCH_{uuid.uuid4().hex[:8]}"
    asyncio.run(_stream(url, name, add=True))
    try:
        p = NatsParams(url, f"{name}.x", count, batch=batch, stream=name, timeout=timeout)
        res = run_stages("raw-jetstream", [[Role("sub", js_consumer, p)], [Role("pub", js_publisher, p)]],
                         timeout + 30)
    finally:
        asyncio.run(_stream(url, name, add=False))
    seconds = (res["sub"]["last_ns"] - res["pub"]["start_ns"]) / 1e9
    return {"msgs_per_s": count / seconds}


async def _stream(url: str, name: str, *, add: bool) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if add:
            await js.add_stream(name=name, subjects=[f"{name}.>"], duplicate_window=120)
        else:
            await js.delete_stream(name)
    finally:
        await nc.close()


# ---------------------------------------------------------------------- across sites
def run_cross_site(sites: Sites, namespace: str, count: int, *, rate: float | None = None,
                   timeout: float = 60.0) -> dict[str, Any]:
    """One publisher on site A awaiting each publish, one subscriber on site B."""
    mode = "paced" if rate else "sequential"
    sub = PeerParams(sites.url("b"), namespace, count, keep_latency=bool(rate), timeout=timeout)
    pub = PeerParams(sites.url("a"), namespace, count, mode=mode, rate=rate, timeout=timeout)
    res = run_stages(f"cross-site-{mode}", [[Role("sub", route_subscriber, sub)],
                                            [Role("pub", route_publisher, pub)]], timeout + 30)
    seconds = (res["sub"]["last_ns"] - res["pub"]["start_ns"]) / 1e9
    return {"msgs_per_s": count / seconds, "latency_ns": res["sub"]["latency_ns"]}


def run_catch_up(sites: Sites, count: int, timeout: float = 120.0) -> dict[str, Any]:
    """Site B away while ``count`` messages are published on A, then back: ``msgs_per_s`` of its
    catching up (from its bridge's return until its subscriber handled the last one)."""
    namespace = f"bench-catchup-{uuid.uuid4().hex[:6]}"
    sites.worker("a", namespace)
    sites.worker("b", namespace, nats=False)  # B's router; its bridge runs on its own below
    bridge = sites.worker("b", namespace)
    sites.wait_federated(namespace, 30)
    sub = PeerParams(sites.url("b"), namespace, count, timeout=timeout)
    pub = PeerParams(sites.url("a"), namespace, count, mode="pipelined", chunk=500, timeout=timeout)
    marks: dict[str, int] = {}
    failures: list[BaseException] = []

    def bring_back() -> None:
        """Once A's bridge put every message in the stream, start B's bridge again."""
        try:
            _until(lambda: _stream_count(sites.nats_url, Keys(namespace)) >= count, timeout,
                   f"{count} messages in the stream")
            client = redis.Redis.from_url(sites.url("b"), decode_responses=True)
            try:
                sites.worker("b", namespace)
                _until(lambda: client.exists(Keys(namespace).bridge_lease), timeout, "B's bridge")
            finally:
                client.close()
            marks["back_ns"] = time.monotonic_ns()  # the site's bridge is back
        except BaseException as exc:
            failures.append(exc)

    def away() -> None:
        """B's bridge goes away (its subscriber is subscribed); A publishes meanwhile."""
        sites.kill(bridge)
        threading.Thread(target=bring_back, daemon=True).start()

    res = run_stages("catch-up", [[Role("sub", route_subscriber, sub)],
                                  [Role("pub", route_publisher, pub)]],
                     timeout + 60, before_go=away)
    if failures:
        raise failures[0]
    seconds = (res["sub"]["last_ns"] - marks["back_ns"]) / 1e9
    return {"msgs_per_s": count / seconds}


def _stream_count(url: str, keys: Keys) -> int:
    async def count() -> int:
        import nats

        nc = await nats.connect(url)
        try:
            return int((await nc.jetstream().stream_info(keys.stream_name)).state.messages)
        finally:
            await nc.close()

    return asyncio.run(count())


def run_cross_site_failover(sites: Sites, timeout: float = 60.0) -> dict[str, Any]:
    """SIGKILL the namespace's leader (two eligible peers per site, default timings): seconds until
    every survivor on both sites saw a new leader with a higher term."""
    namespace = f"bench-xfail-{uuid.uuid4().hex[:6]}"
    for site in SITES:
        sites.worker(site, namespace)
    sites.wait_federated(namespace, 30)
    files = {(site, k): sites.dir / f"{namespace}-{site}{k}.jsonl" for site in SITES for k in (0, 1)}
    peers = {key: sites.spawn(sites.env(key[0], namespace), "-m", "bench.ha_peer", str(path))
             for key, path in files.items()}

    def views() -> dict[tuple[str, int], tuple[str, int] | None]:
        out: dict[tuple[str, int], tuple[str, int] | None] = {}
        for key, path in files.items():
            seen = [r for r in _lines(path) if "leader" in r]
            out[key] = (str(seen[-1]["leader"] or ""), int(seen[-1]["term"])) if seen else None
        return out

    def agreed() -> tuple[str, int] | None:
        found = set(views().values())
        one = found.pop() if len(found) == 1 else None
        return one if one and one[0] else None

    leader, term = _until(agreed, timeout, "one leader on both sites")
    ids = {key: next((r["ready"] for r in _lines(path) if "ready" in r), None)
           for key, path in files.items()}
    victim = next(key for key, peer in ids.items() if peer == leader)
    killed = time.monotonic()
    sites.kill(peers[victim])

    def moved() -> bool:
        now = views()
        return all(v is not None and v[1] > term and v[0] and v[0] != leader
                   for key, v in now.items() if key != victim)

    _until(moved, timeout, "a new leader on both sites")
    survivors = [k for k in files if k != victim]
    seen_at = max(next(r["t"] for r in _lines(files[k]) if "leader" in r and r["term"] > term
                       and r["leader"]) for k in survivors)
    for proc in peers.values():
        sites.kill(proc, signal.SIGTERM)
    return {"failover_s": seen_at - killed}


def _lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
