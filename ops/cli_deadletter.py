"""``sidecar deadletter list`` and ``sidecar deadletter replay``: what was refused or given up."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from coordinator.routing.rejections import DeadLetters

__all__ = ["deadletter"]


def _letters(ctx: click.Context) -> DeadLetters:
    obj = ctx.obj
    return DeadLetters(obj.client(), obj.keys, obj.settings)


@click.group()
def deadletter() -> None:
    """Requests the router refused and messages subscribers gave up, with the reason."""


@deadletter.command("list")
@click.option("--count", default=50, show_default=True, help="How many of the newest to show.")
@click.option("--reason", help="Only this reason (handler_failed, expired, inbox_full, bad_request...).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_(ctx: click.Context, count: int, reason: str | None, as_json: bool) -> None:
    """The newest dead letters, oldest first."""
    rows = _letters(ctx).list(count, reason)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    for r in rows:
        who = r.get("peer") or r.get("sender") or "?"
        click.echo(f"{r['id']} {r.get('reason', '?'):<15} {who} {r.get('topic', '')} "
                   f"{r.get('message', '')}".rstrip())
    if not rows:
        click.echo("(no dead letters)")


@deadletter.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def replay(ctx: click.Context, ids: tuple[str, ...], as_json: bool) -> None:
    """Send dead letters IDS again (a delivery to its peer's inbox, a request to its stream)."""
    letters = _letters(ctx)
    results: list[dict[str, Any]] = []
    for entry_id in ids:
        try:
            results.append({"id": entry_id, "ok": True, "to": letters.replay(entry_id)})
        except (KeyError, ValueError) as exc:
            results.append({"id": entry_id, "ok": False, "error": str(exc).strip("'\"")})
    if as_json:
        click.echo(json.dumps(results, indent=2, sort_keys=True))
    else:
        for r in results:
            click.echo(f"{r['id']}: replayed to {r['to']}" if r["ok"] else f"{r['id']}: {r['error']}")
    if not all(r["ok"] for r in results):
        sys.exit(1)
