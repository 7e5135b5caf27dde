"""Leader election among live, eligible members: one atomic compare-and-set script (elect.lua).

Sticky: a live leader keeps the role. When it dies or leaves, the next leader is the live eligible
member with the highest priority, then the oldest ULID. Each change increments the term, the
fencing token that fenced publishes carry and the router checks. Running the election twice, late,
or from two beats at once cannot yield two leaders or a term that goes backwards.
"""

from __future__ import annotations

from typing import Any

from coordinator.cluster.membership import elect_call
from coordinator.keys import Keys
from coordinator.scripts import scripts_for

__all__ = ["Election"]


class Election:
    """Runs elect.lua on a sync client and reads the leader record."""

    def __init__(self, client: Any, keys: Keys, member_ttl: float) -> None:
        self.client = client
        self.keys = keys
        self.member_ttl = member_ttl
        self.scripts = scripts_for(client)

    def run(self, reason: str = "periodic") -> tuple[str, str | None, int]:
        """Keep or change the leader: returns (kept | elected | vacated | none, leader id, term);
        ``vacated``: this call found the leader gone and no eligible member to follow it."""
        ks, args = elect_call(self.keys, self.member_ttl, reason)
        status, leader, term = self.scripts.elect(keys=ks, args=args)
        return str(status), (str(leader) or None), int(term)

    def leader(self) -> tuple[str | None, int]:
        """(leader id or None, term) as recorded now."""
        leader, term = self.client.hmget(self.keys.leader, "id", "term")
        return (leader or None), int(term or 0)
