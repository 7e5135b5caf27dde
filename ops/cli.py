"""The ``sidecar`` command (click): run a sidecar, inspect a cluster and steer it.

Shared options carry ``envvar=`` so ``SIDECAR_REDIS_URL`` and ``SIDECAR_NAMESPACE`` work everywhere;
a flag beats the environment, which beats the default. Every read command takes ``--json``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import click
import redis

from coordinator.errors import SidecarError
from coordinator.keys import Keys
from coordinator.logs import configure
from coordinator.settings import Settings
from coordinator.topics import check_publish_topic
from ops.report import (
    cluster_report,
    inbox_report,
    leadership_report,
    members_report,
    recent_events,
    sites_report,
    subscriptions_report,
    workers_report,
)

__all__ = ["cli", "main"]


class Context:
    def __init__(self, redis_url: str | None, namespace: str | None) -> None:
        self.settings = Settings.from_env(redis_url=redis_url, namespace=namespace)
        self.keys = Keys(self.settings.namespace)
        self._client: redis.Redis | None = None

    def require_redis(self) -> str:
        """The Redis URL, or a usage error saying how to give one."""
        if not self.settings.redis_url:
            raise click.UsageError("no Redis to talk to: set SIDECAR_REDIS_URL or pass --redis-url")
        return self.settings.redis_url

    def client(self) -> redis.Redis:
        """A client for this command (closed when the command ends)."""
        if self._client is None:
            self._client = redis.Redis.from_url(self.require_redis(), decode_responses=True)
            click.get_current_context().call_on_close(self._client.close)
        return self._client


pass_ctx = click.make_pass_decorator(Context)


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


PROG = "sidecar"
"""The console script's name: run under it, the CLI sets up the process's logging."""


@click.group()
@click.option("--redis-url", envvar="SIDECAR_REDIS_URL", help="Redis of the cluster.")
@click.option("--namespace", envvar="SIDECAR_NAMESPACE", help="Cluster namespace.")
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None, namespace: str | None) -> None:
    """Plantangenet cluster sidecar on Celery and Redis."""
    try:
        ctx.obj = Context(redis_url, namespace)
    except SidecarError as exc:
        raise click.UsageError(str(exc)) from None
    if ctx.info_name == PROG:
        # the `sidecar` process itself (main): SIDECAR_LOG_FORMAT / SIDECAR_LOG_LEVEL, to stderr. A
        # caller running the group in its own process (a test, an app) keeps its own logging.
        configure(ctx.obj.settings, component="cli")


@cli.command()
@click.option("--duration", type=float, help="Stop on its own after this many seconds.")
@click.option("--demo/--no-demo", "--peers/--no-peers", "peers", default=True,
              help="Start the demo conductor and followers.")
@click.option("--flower/--no-flower", default=False, help="Start Flower on loopback.")
@click.option("--dashboard/--no-dashboard", default=False,
              help="Serve the dashboard on loopback and print its address.")
@click.option("--sites", type=click.IntRange(1, 9), default=1, show_default=True,
              help="Sites to run, each with its own Redis, joined by an embedded NATS JetStream.")
@pass_ctx
def up(obj: Context, duration: float | None, peers: bool, flower: bool, dashboard: bool,
       sites: int) -> None:
    """Run a sidecar (worker + beat) with demo peers; embedded Redis unless SIDECAR_REDIS_URL is set.
    With --sites N, N sites on this machine federated through NATS. On a terminal it draws a live
    view (sites, peers, leader, policy states, rates); otherwise a status line each second."""
    from ops.supervisor import Supervisor

    click.echo(f"settings: {obj.settings!r}")
    try:
        supervisor = Supervisor(obj.settings, peers=peers, flower=flower, dashboard=dashboard,
                                sites=sites, live=sys.stdout.isatty(), echo=click.echo)
        status = supervisor.run(duration)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(status)


def _shown(value: Any) -> str:
    """``value`` as text for a terminal: what a peer chose (role, labels) can neither start a
    new line nor send escape sequences."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def _member_line(m: dict[str, Any], *, full: bool = False) -> str:
    """One member on one line: id, name, role, leader mark, policy state, inbox, last heartbeat;
    with ``full`` also labels, priority and the peer's status fields and heartbeat payload."""
    lag = "?" if m["inbox_lag"] is None else m["inbox_lag"]
    line = (f"{m['id']} {_shown(m['name'] or '-'):<14} {_shown(m['role']):<10}"
            f"{' LEADER' if m['leader'] else ''} "
            f"policy={m['policy_state']} inbox={m['inbox_length']} lag={lag} "
            f"drops={m['inbox_drops']} last_seen={m['last_seen_s']}s")
    if full:
        labels = ",".join(f"{_shown(k)}={_shown(v)}" for k, v in sorted(m["labels"].items()))
        line += f" prio={m['priority']} eligible={m['eligible']}" + (f" labels={labels}" if labels else "")
        if m["status"]:
            line += " status=" + json.dumps(m["status"], sort_keys=True, separators=(",", ":"))
        if m["extra"] is not None:
            line += " extra=" + json.dumps(m["extra"], sort_keys=True, separators=(",", ":"))
    return line


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def status(obj: Context, as_json: bool) -> None:
    """Cluster size, leader and term, subscriptions, routers, counters and the data path."""
    report = cluster_report(obj.client(), obj.keys)
    report["members"] = members_report(obj.client(), obj.keys)
    lines = [f"{k}: {v}" for k, v in report.items() if k not in ("members", "sites", "throttled")]
    lines += [f"throttled {peer}: read again in {wait}s (over SIDECAR_PEER_RATE)"
              for peer, wait in report["throttled"].items()]
    lines += [f"site {name}: {s['members']} members, leader {s['leader'] or 'none'}, "
              + ("reachable" if s["reachable"] else "NOT REACHABLE")
              for name, s in report["sites"].items()]
    lines += [f"  {_member_line(m)}" for m in report["members"]]
    _emit(report, as_json, "\n".join(lines))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def peers(obj: Context, as_json: bool) -> None:
    """Live members with role, priority, last heartbeat and inbox drops; with federation on, the
    members of the other sites too (as this site's bridge last heard them)."""
    rows = members_report(obj.client(), obj.keys)
    text = "\n".join(_member_line(m, full=True) for m in rows) or "(no members)"
    sites = sites_report(obj.client(), obj.keys)
    own = str(obj.client().get(obj.keys.site_name) or obj.settings.site or "")
    others = [{"id": peer, "role": role, "site": name, "reachable": site["reachable"]}
              for name, site in sites.items() if name != own
              for peer, role in sorted(site["members"].items())]
    if sites:
        rows = [{**m, "site": own} for m in rows] + others
        text += "".join(f"\n{m['id']} {_shown(m['role']):<10} site={m['site']}"
                        + ("" if m["reachable"] else " (site not reachable)") for m in others)
    _emit(rows, as_json, text)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def leader(obj: Context, as_json: bool) -> None:
    """Current leader and term, and the history of terms (who led, after whom, why);
    ``sidecar events`` lists the membership events."""
    report = cluster_report(obj.client(), obj.keys)
    data = {"leader_id": report["leader_id"], "leader_term": report["leader_term"],
            "history": leadership_report(obj.client(), obj.keys)}
    text = f"leader {data['leader_id'] or 'none'} term {data['leader_term']}\n" + "\n".join(
        f"term {h['leader_term']}: {h['leader_id'] or 'none'} (after {h['previous'] or 'none'}, "
        f"{h['reason'] or '?'})" for h in data["history"])
    _emit(data, as_json, text)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def subscriptions(obj: Context, as_json: bool) -> None:
    """Every subscription: pattern, queue group and peer."""
    rows = subscriptions_report(obj.client(), obj.keys)
    text = "\n".join(f"{r['pattern']:<32} {('queue ' + r['queue']) if r['queue'] else '':<20} {r['peer']}"
                     for r in rows) or "(no subscriptions)"
    _emit(rows, as_json, text)


@cli.command()
@click.argument("peer_id")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def inbox(obj: Context, peer_id: str, as_json: bool) -> None:
    """PEER_ID's inbox: entries held, pending (read, not acknowledged), lag (not read yet), the
    oldest entry's age, and what a full inbox dropped or refused."""
    report = inbox_report(obj.client(), obj.keys, peer_id)
    if report is None:
        raise click.ClickException(f"no inbox and no member {peer_id!r} in namespace "
                                   f"{obj.settings.namespace!r}; `sidecar peers` lists the members")
    text = (f"{peer_id}{'' if report['member'] else ' (not a member)'}: {report['length']} held, "
            f"{report['pending']} pending, lag {report['lag'] if report['lag'] is not None else '?'}, "
            f"oldest {report['oldest_s'] if report['oldest_s'] is not None else '-'}s, "
            f"dropped {report['drops']}")
    _emit(report, as_json, text)


@cli.command()
@click.option("--count", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def events(obj: Context, count: int, as_json: bool) -> None:
    """The latest membership and leadership events, oldest first."""
    rows = recent_events(obj.client(), obj.keys, count)
    text = "\n".join(" ".join(f"{k}={v}" for k, v in e.items()) for e in rows) or "(no events)"
    _emit(rows, as_json, text)


@cli.command()
@click.argument("topic")
@click.argument("data")
@pass_ctx
def publish(obj: Context, topic: str, data: str) -> None:
    """Publish DATA (JSON text) to TOPIC as a short-lived peer."""
    try:
        payload = json.loads(data)
    except ValueError:
        raise click.BadParameter("DATA must be JSON text, e.g. '{\"tempo\": 90}'") from None
    try:  # refuse a bad topic before joining the cluster for it
        check_publish_topic(topic)
    except SidecarError as exc:
        raise click.BadParameter(str(exc), param_hint="TOPIC") from None
    obj.require_redis()
    from mixin import Agent, SidecarMixin

    class Cli(Agent, SidecarMixin):
        pass

    async def go() -> str:
        async with Cli(namespace=obj.settings.namespace, settings=obj.settings, role="cli",
                       leader_eligible=False) as peer:
            return await peer.cluster_publish(topic, payload)

    try:
        message_id = asyncio.run(go())
    except SidecarError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"published to {topic}: message id {message_id}")


@cli.command()
@click.argument("pattern", default=">")
@click.option("--count", type=int, help="Exit after this many messages.")
@pass_ctx
def tail(obj: Context, pattern: str, count: int | None) -> None:
    """Print messages matching PATTERN as JSON lines until Ctrl-C (or --count)."""
    obj.require_redis()
    from mixin import Agent, Message, SidecarMixin

    class Tail(Agent, SidecarMixin):
        pass

    async def go() -> None:
        done = asyncio.Event()
        seen = 0

        def show(m: Message) -> None:
            nonlocal seen
            click.echo(json.dumps({"topic": m.topic, "sender": m.sender, "id": m.id,
                                   "timestamp": m.timestamp, "data": m.data}))
            seen += 1
            if count is not None and seen >= count:
                done.set()

        async with Tail(namespace=obj.settings.namespace, settings=obj.settings, role="cli",
                        leader_eligible=False) as peer:
            await peer.cluster_subscribe(pattern, show)
            await done.wait()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass
    except SidecarError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@click.argument("peer_id")
@click.option("--timeout", type=float, default=10.0)
@pass_ctx
def evict(obj: Context, peer_id: str, timeout: float) -> None:
    """Remove PEER_ID from the cluster now (a Celery task, visible in Flower)."""
    obj.require_redis()
    from workers.application import app
    from workers.tasks import evict as evict_task

    app.use_sidecar_settings(obj.settings)  # the flags, not only SIDECAR_*, pick broker and queue

    try:
        left = evict_task.delay(peer_id).get(timeout=timeout)
    except Exception as exc:  # celery raises its own TimeoutError and transport errors
        raise click.ClickException(f"evict did not complete ({exc}); is a worker running?") from None
    click.echo(f"{peer_id} evicted" if left else f"{peer_id} was not a member")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def doctor(obj: Context, as_json: bool) -> None:
    """Check Redis (version, eviction policy; in hardened mode its users and the peer key) and
    show the timings the sidecar would run with."""
    from ops.doctor import diagnose, timing_figures

    checks = diagnose(obj.client(), obj.settings)
    timings = timing_figures(obj.settings)
    data = {"checks": [c.as_dict() for c in checks], "timings": timings,
            "settings": obj.settings.describe()}
    text = "\n".join(f"[{c.level:>4}] {c.name}: {c.detail}" for c in checks) + "\n" + "\n".join(
        f"  {k} = {v}" for k, v in timings.items())
    _emit(data, as_json, text)
    if any(c.level == "fail" for c in checks):
        sys.exit(1)


@cli.command()
@click.option("--user", default="sidecar", show_default=True, help="The sidecar's own Redis user.")
@click.option("--keep-default", is_flag=True, help="Leave Redis's default user as it is.")
@pass_ctx
def harden(obj: Context, user: str, keep_default: bool) -> None:
    """Give the sidecar a Redis user of its own and turn the open default user off.

    Prints the SIDECAR_REDIS_URL the workers, beat and the CLI use from now on (keep it secret);
    peers get theirs from `sidecar peer add --redis-acl`."""
    import secrets
    from urllib.parse import quote, urlsplit, urlunsplit

    client = obj.client()
    password = secrets.token_urlsafe(32)
    try:
        client.acl_setuser(user, enabled=True, reset_passwords=True, passwords=[f"+{password}"],
                           keys=["~*"], channels=["*"], commands=["+@all"])  # redis-py adds the '&'
    except redis.ResponseError as exc:
        raise click.ClickException(f"cannot create Redis user {user!r} ({exc}); run this as an "
                                   "administrator of that Redis") from None
    parts = urlsplit(obj.require_redis())
    if not parts.hostname:
        raise click.ClickException("sidecar harden needs a redis:// or rediss:// URL with a host")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (
        f":{parts.port}" if parts.port else "")
    url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    with redis.Redis.from_url(url, decode_responses=True) as own:
        own.ping()  # the new user works before the old door closes
        if not keep_default:
            own.acl_setuser("default", enabled=False)
        try:
            own.acl_save()
        except redis.ResponseError:
            click.echo("note: this Redis has no aclfile, so these users last until it restarts; "
                       "add them to its configuration", err=True)
    click.echo(f"SIDECAR_REDIS_URL={url}")
    if not keep_default:
        click.echo("the default user is off: clients need a user and password now", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def workers(obj: Context, as_json: bool) -> None:
    """The sidecar's own processes: each router with the partitions it holds, and who holds each
    lease (partitions, beat, bridge) for how long still. Exits 1 when no router or no beat holds
    its lease (nothing would be routed, or no periodic duty would run): a health check."""
    report = workers_report(obj.client(), obj.keys, obj.settings.partitions)

    def held(what: str, h: dict[str, Any] | None) -> str:
        return f"{what}: {h['name']} (pid {h['pid']}, {h['expires_in_s']}s left)" if h else f"{what}: NONE"

    lines = [f"router {r['name']}: partitions {', '.join(map(str, r['partitions'])) or 'none (standby)'}, "
             f"checked in {r['checked_in_s_ago']}s ago" for r in report["routers"]] or ["no router"]
    lines += [held(f"partition {p['partition']}", p["holder"]) for p in report["partitions"]]
    lines += [held("beat", report["beat"])] + ([held("bridge", report["bridge"])] if report["bridge"] else [])
    _emit(report, as_json, "\n".join(lines))
    if report["beat"] is None or any(p["holder"] is None for p in report["partitions"]):
        sys.exit(1)


@cli.command()
@click.option("--host", help="Listen address (default: SIDECAR_DASHBOARD_HOST, else 127.0.0.1); "
              "beyond loopback it needs SIDECAR_DASHBOARD_USER/PASSWORD.")
@click.option("--port", type=int, help="Port (default: SIDECAR_DASHBOARD_PORT, else 8765).")
@pass_ctx
def dashboard(obj: Context, host: str | None, port: int | None) -> None:
    """Serve the live dashboard of the cluster (its JSON under /api/..., /metrics, /healthz)."""
    from ops.dashboard import make_server

    obj.require_redis()
    host = host or obj.settings.dashboard_host
    try:
        server = make_server(obj.settings, host, obj.settings.dashboard_port if port is None else port)
    except (SidecarError, OSError) as exc:  # a bad setting, or the port taken
        raise click.UsageError(str(exc)) from None
    click.echo(f"dashboard on http://{host}:{server.server_address[1]}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the benchmark suite (same as `make bench`)."""
    sys.exit(subprocess.call([sys.executable, "-m", "bench", *args]))


def _register_groups() -> None:
    from ops.cli_deadletter import deadletter
    from ops.cli_policy import peer, policy

    cli.add_command(policy)
    cli.add_command(peer)
    cli.add_command(deadletter)


_register_groups()


def main() -> None:
    """Console-script entry point: Redis out of reach is one line with the fix, not a traceback."""
    try:
        cli(prog_name=PROG)
    except redis.ConnectionError as exc:
        click.echo(f"Error: cannot reach Redis ({exc}); is it running, and is SIDECAR_REDIS_URL "
                   "(or --redis-url) right?", err=True)
        sys.exit(1)
    except redis.AuthenticationError as exc:
        click.echo(f"Error: Redis refused the credentials ({exc}); check the user and password in "
                   "SIDECAR_REDIS_URL", err=True)
        sys.exit(1)
