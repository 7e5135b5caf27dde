"""``sidecar policy ...`` and ``sidecar peer add``: policy documents, rollout status, identities."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from coordinator.errors import SidecarError
from coordinator.policy.auth import Identities
from coordinator.policy.store import PolicyStore

__all__ = ["peer", "policy"]


def _store(ctx: click.Context) -> PolicyStore:
    obj = ctx.obj
    return PolicyStore(obj.client(), obj.keys)


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


@click.group()
def policy() -> None:
    """Versioned policy documents, distributed to every peer and acknowledged per peer."""


@policy.command("set")
@click.argument("name")
@click.argument("source", type=click.File("r"))
@click.option("--by", default="cli", help="Who sets it (kept in the history).")
@click.pass_context
def set_(ctx: click.Context, name: str, source: Any, by: str) -> None:
    """Set policy NAME from SOURCE (a JSON or YAML file, or - for standard input)."""
    store = _store(ctx)
    try:
        version = store.set(name, source.read(), by=by)
    except SidecarError as exc:
        raise click.ClickException(str(exc)) from None
    sent = store.distribute(force=True)
    click.echo(f"policy {name} set: policy set version {version}; sent to {sent} peers")


@policy.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def get(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show the current document of NAME."""
    record = _store(ctx).get(name)
    if record is None:
        raise click.ClickException(f"no policy named {name!r}")
    _emit(record, as_json, json.dumps(record["document"], indent=2))


@policy.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """Every policy with its version and who set it."""
    docs = _store(ctx).documents()
    text = "\n".join(f"{n}  version {r['version']}  by {r['set_by']}  ({r['action']})"
                     for n, r in sorted(docs.items())) or "(no policies)"
    _emit(docs, as_json, text)


@policy.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx: click.Context, name: str, as_json: bool) -> None:
    """Every version NAME had, oldest first."""
    rows = _store(ctx).history(name)
    text = "\n".join(f"version {r['version']}  {r['action']}  by {r['set_by']}  at {r['set_at']}"
                     for r in rows) or f"(no history for {name})"
    _emit(rows, as_json, text)


@policy.command()
@click.argument("name")
@click.argument("version", type=int)
@click.pass_context
def rollback(ctx: click.Context, name: str, version: int) -> None:
    """Make the document NAME had at VERSION current again (as a new version)."""
    store = _store(ctx)
    try:
        new = store.rollback(name, version)
    except SidecarError as exc:
        raise click.ClickException(str(exc)) from None
    sent = store.distribute(force=True)
    click.echo(f"policy {name} rolled back to version {version}: now version {new}; sent to {sent} peers")


@policy.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Each live peer: SYNCED, STALE or NACKED (with the error)."""
    rows = _store(ctx).status()
    text = "\n".join(f"{r['peer_id']}  {r['state']:<6}  applied={r['applied']}"
                     + (f"  error={r['error']}" if r["state"] == "NACKED" else "")
                     for r in rows) or "(no members)"
    counts = {s: sum(r["state"] == s for r in rows) for s in ("SYNCED", "STALE", "NACKED")}
    _emit({"peers": rows, "counts": counts}, as_json,
          text + "\n" + "  ".join(f"{k}={v}" for k, v in counts.items()))


@click.group()
def peer() -> None:
    """Peer identities for authenticated mode (SIDECAR_AUTH=required)."""


@peer.command()
@click.argument("name")
@click.option("--role", "roles", multiple=True, required=True, help="Role (repeatable).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Label policies may require (repeatable).")
@click.option("--priority", type=int, default=0, show_default=True,
              help="Leader priority: the highest live eligible member leads.")
@click.option("--no-leader", is_flag=True, help="Never elect this peer leader.")
@click.option("--redis-acl", is_flag=True, help="Also create a Redis ACL user for the peer.")
@click.pass_context
def add(ctx: click.Context, name: str, roles: tuple[str, ...], labels: tuple[str, ...], priority: int,
        no_leader: bool, redis_acl: bool) -> None:
    """Create identity NAME and print the environment the peer needs (keep it secret).

    In authenticated mode the peer's roles, labels, leader priority and eligibility are these,
    whatever it claims when it registers."""
    pairs = {}
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{label!r} is not KEY=VALUE", param_hint="--label")
        pairs[key] = value
    try:
        out = _identities(ctx).add(name, list(roles), labels=pairs, priority=priority,
                                   eligible=not no_leader, redis_acl=redis_acl)
    except SidecarError as exc:
        raise click.ClickException(str(exc)) from None
    _print_env(out)


@peer.command()
@click.argument("peer_ref", metavar="PEER")
@click.option("--redis-acl", is_flag=True, help="Also give the peer's Redis user a new password.")
@click.pass_context
def rotate(ctx: click.Context, peer_ref: str, redis_acl: bool) -> None:
    """Give PEER (id or name) a new secret and print it; the old one stops working as soon as
    the routers next look at the identities (within a lease renewal)."""
    try:
        out = _identities(ctx).rotate(peer_ref, redis_acl=redis_acl)
    except SidecarError as exc:
        raise click.ClickException(str(exc)) from None
    _print_env(out)


@peer.command()
@click.argument("peer_ref", metavar="PEER")
@click.pass_context
def revoke(ctx: click.Context, peer_ref: str) -> None:
    """Delete PEER's identity (id or name) and Redis user, and evict it: nothing it sends is
    routed from the routers' next look at the identities on."""
    from coordinator.cluster.duties import Duties

    obj = ctx.obj
    try:
        peer_id = _identities(ctx).revoke(peer_ref)
        evicted = Duties(obj.client(), obj.settings).evict(peer_id)
    except SidecarError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{peer_id} revoked" + (" and evicted" if evicted else ""))


def _identities(ctx: click.Context) -> Identities:
    obj = ctx.obj
    return Identities(obj.client(), obj.keys, obj.settings.peer_key)


def _print_env(out: dict[str, str]) -> None:
    for key, value in out.items():
        sys.stdout.write(f"{key}={value}\n")
