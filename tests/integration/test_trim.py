"""The trim duty against a real Redis: old entries go, inboxes of long-gone peers go, nothing else."""

from __future__ import annotations

import redis

from coordinator.cluster.duties import Duties
from coordinator.cluster.membership import Membership
from coordinator.keys import PEER_GROUP, Keys
from coordinator.settings import Settings
from tests.support import wait_for


def inbox(client: redis.Redis, keys: Keys, peer: str, *, used: bool = True) -> str:
    """A peer's empty inbox with its group; ``used``: its reader took (and acked) one entry."""
    key = keys.responses(peer)
    client.xgroup_create(key, PEER_GROUP, id="0", mkstream=True)
    if used:
        deliver(client, key)
    return key


def deliver(client: redis.Redis, key: str) -> None:
    """One entry written, read, acknowledged and deleted, as a live peer's inbox sees them."""
    eid = client.xadd(key, {"k": "msg"})
    client.xreadgroup(PEER_GROUP, "c", {key: ">"})
    client.xack(key, PEER_GROUP, eid)
    client.xdel(key, eid)


def test_trim_deletes_only_the_inboxes_of_long_gone_peers(client: redis.Redis,
                                                          settings: Settings) -> None:
    st = settings.replace(inbox_max_age=0.5)
    keys = Keys(st.namespace)
    duties = Duties(client, st)
    Membership(client, keys).register("member01")
    member, gone = inbox(client, keys, "member01"), inbox(client, keys, "gone01")
    busy = inbox(client, keys, "busy01")  # not a member (say evicted) but still reading
    # between creating its inbox and registering (or crashed then): nothing tells its age
    fresh = inbox(client, keys, "fresh01", used=False)
    assert duties.trim()["deleted"] == 0

    def gone_deleted() -> bool:
        deliver(client, busy)
        duties.trim()
        return not client.exists(gone)

    wait_for(gone_deleted, timeout=10, what="the long-gone peer's inbox deleted")
    assert client.exists(member, busy, fresh) == 3


def test_trim_keeps_inboxes_with_entries_or_pending_ones_and_trims_old_entries_but_exports(
        client: redis.Redis, settings: Settings) -> None:
    st = settings.replace(inbox_max_age=0.3)
    keys = Keys(st.namespace)
    duties = Duties(client, st)
    pending = inbox(client, keys, "pending01")
    client.xadd(pending, {"k": "msg"})
    client.xreadgroup(PEER_GROUP, "c", {pending: ">"})  # read, never acknowledged
    unread = inbox(client, keys, "unread01")
    client.xadd(unread, {"k": "old"})
    Membership(client, keys).register("bridge-x", role="bridge", eligible=False)
    leaving = inbox(client, keys, "bridge-x", used=False)
    client.xadd(leaving, {"k": "msg"})  # waits to leave the site: its bridge bounds it
    wait_for(lambda: min(c["idle"] for key in (pending, unread)
                         for c in client.xinfo_consumers(key, PEER_GROUP)) > 400,
             timeout=10, what="both readers idle past the age")
    client.xadd(unread, {"k": "new"})
    result = duties.trim()
    assert result["deleted"] == 0
    assert result["trimmed"] == 2  # the old entries of both
    assert [f["k"] for _, f in client.xrange(unread)] == ["new"]
    assert client.xlen(leaving) == 1
    assert client.exists(pending) == 1  # emptied by the trim, but an entry is still pending
    assert client.xpending(pending, PEER_GROUP)["pending"] == 1
