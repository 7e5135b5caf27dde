"""The one place that names Redis keys and NATS subjects.

Key map (``{ns}`` is the namespace inside a Redis Cluster hash tag, so one namespace's keys share a
slot and multi-key scripts stay legal on a cluster)::

    sidecar:{ns}:sidecar.requests        stream   request partition 0 (publish, subscribe, register, ...)
    sidecar:{ns}:sidecar.requests.<k>    stream   request partition k > 0
    sidecar:{ns}:sidecar.responses.<id>  stream   peer <id>'s inbox: deliveries and control replies
    sidecar:{ns}:deadletter              stream   rejected request entries with the reason
    sidecar:{ns}:inbox.drops             hash     peer_id -> messages its full inbox dropped or refused
    sidecar:{ns}:inbox.slow              set      members whose inbox lags now (one slow event each)
    sidecar:{ns}:subs                    hash     "<peer_id> <pattern>[ <queue>]" -> "": subscriptions
    sidecar:{ns}:routes                  hash     pattern -> newline-separated "<peer_id>[ <queue>]": the
                                                  same subscriptions by pattern (the direct data path)
    sidecar:{ns}:group.turns             hash     "<queue> <pattern>" -> deliveries so far (direct path turns)
    sidecar:{ns}:dataplane               hash     how peers publish: mode (direct | routed) and the limits
    sidecar:{ns}:publish.last            hash     peer_id -> key of its last batch on the direct path
    sidecar:{ns}:sidecar.system          stream   the sidecar's own events (cluster.*), trusted, partition 0
    sidecar:{ns}:routing.version         string   bumped on every member or subscription change
    sidecar:{ns}:members                 zset     peer_id -> last heartbeat (Redis server ms)
    sidecar:{ns}:member.<id>             hash     role, labels, priority, eligible, joined, incarnation, ...
    sidecar:{ns}:electorate              zset     eligible peer_id -> -priority (election order)
    sidecar:{ns}:leader                  hash     id, term, since
    sidecar:{ns}:events                  stream   membership and leadership changes, with term and reason
    sidecar:{ns}:router.lease.<k>        string   token of the router owning partition k (PX lease)
    sidecar:{ns}:routers                 zset     worker name -> last renewal ms (partition spreading)
    sidecar:{ns}:beat.lease              string   token of the beat allowed to dispatch
    sidecar:{ns}:bridge.lease            string   token of this site's active NATS bridge (PX lease)
    sidecar:{ns}:bridge.applied          string   last JetStream sequence delivered on this site
    sidecar:{ns}:site                    string   this site's name, set by the first bridge to run here
    sidecar:{ns}:sites                   hash     site -> its record as the bridge last saw it (JSON:
                                                  members, leader, reachable), from NATS
    sidecar:{ns}:stats                   hash     counters written by routers: routed, delivered, rejected
    sidecar:{ns}:policy.docs             hash     policy name -> current record (version, document, ...)
    sidecar:{ns}:policy.history.<name>   list     every record that name ever had
    sidecar:{ns}:policy.version          string   version of the policy set (grows on every change)
    sidecar:{ns}:policy.sent             hash     peer_id -> last distribution (version, nonce, retry)
    sidecar:{ns}:policy.acks             hash     peer_id -> last ack/nack (version, nonce, error, when)
    sidecar:{ns}:identities              hash     peer_id -> identity (name, roles, secret)
    sidecar:{ns}:peer.<id>.<key>         string   a peer's own storage (mixin.RedisMixin), JSON values
    sidecar:{ns}:nonces                  hash     peer_id -> "<nonce> <entry id>" of its last accepted
                                                  signed request (replay protection across routers)

Celery's broker and result keys live under ``sidecar-celery:{ns}:`` so they never mix with these.

NATS names (federation, coordinator.federation)::

    _SIDECAR.<ns>.msg.<topic>     subject   a site's message on that topic, into the stream
    _SIDECAR.<ns>.plain.<topic>   subject   a plain NATS client's message, put in the stream by the
                                            bridge that took it from <ns>.<topic>
    SIDECAR_<ns>                  stream    JetStream stream of the namespace (those subjects), which
                                            republishes every site's message on <ns>.<topic>
    <ns>.<topic>                  subject   what plain NATS clients subscribe to and publish on
    site_<site>                   consumer  each site's durable consumer of the stream
    _SIDECAR.<ns>.reply.<site>    subject   answers to requests that site's peers made (core NATS)
    sidecar_<ns>                  KV bucket site.<site> records and the cluster-wide leader
"""

from __future__ import annotations

import zlib

__all__ = ["PEER_GROUP", "REQUEST_GROUP", "Keys"]

REQUEST_GROUP = "routers"
"""Consumer group the routers read request partitions with."""
PEER_GROUP = "peer"
"""Consumer group a peer reads its own response stream with."""
PEER_REQUESTS = "sidecar.requests.peer."
"""Prefix (after the namespace's) of each peer's own request stream (see Keys.peer_requests)."""


class Keys:
    """Builds every key of one namespace. Cheap to create; holds no connection."""

    __slots__ = ("_p", "namespace")

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._p = f"sidecar:{{{namespace}}}:"

    # data plane
    def requests(self, partition: int = 0) -> str:
        """Request stream of ``partition`` (partition 0 keeps the plain name)."""
        base = self._p + "sidecar.requests"
        return base if partition == 0 else f"{base}.{partition}"

    def peer_requests(self, peer_id: str) -> str:
        """Request stream of ``peer_id`` alone, with ``SIDECAR_AUTH=required``: its Redis user may
        append there and to no other request stream, so nothing it sends can touch another
        peer's requests. The router of ``partition_of(peer_id)`` reads it."""
        return f"{self._p}{PEER_REQUESTS}{peer_id}"

    def responses(self, peer_id: str) -> str:
        """Response stream (inbox) of ``peer_id``."""
        return f"{self._p}sidecar.responses.{peer_id}"

    @property
    def responses_prefix(self) -> str:
        """Prefix shared by every response stream (for scans)."""
        return self._p + "sidecar.responses."

    @property
    def deadletter(self) -> str:
        return self._p + "deadletter"

    @property
    def inbox_drops(self) -> str:
        """Messages each peer's full inbox dropped (drop_oldest) or refused (reject)."""
        return self._p + "inbox.drops"

    @property
    def slow(self) -> str:
        """Members whose inbox lag is past the limit now (cluster.member.slow was emitted)."""
        return self._p + "inbox.slow"

    @property
    def subs(self) -> str:
        return self._p + "subs"

    @property
    def routes(self) -> str:
        """The subscriptions by pattern, written with ``subs`` by the same scripts."""
        return self._p + "routes"

    @property
    def group_turns(self) -> str:
        """Round-robin counters of the queue groups on the direct path."""
        return self._p + "group.turns"

    @property
    def dataplane(self) -> str:
        """How peers publish (direct or through the router) and the limits that apply; the
        router writes it, peers read it when they register."""
        return self._p + "dataplane"

    @property
    def publish_last(self) -> str:
        """Each sender's last direct batch, so a batch sent again after a lost reply is not
        applied twice."""
        return self._p + "publish.last"

    @property
    def routing_version(self) -> str:
        """Bumped by every script that changes members or subscriptions; routers fence on it."""
        return self._p + "routing.version"

    @property
    def system(self) -> str:
        """Stream of the sidecar's own events; only scripts write it, the partition 0 router reads it."""
        return self._p + "sidecar.system"

    # membership and election
    @property
    def members(self) -> str:
        return self._p + "members"

    def member(self, peer_id: str) -> str:
        return f"{self._p}member.{peer_id}"

    @property
    def electorate(self) -> str:
        """Leader-eligible members scored by -priority (ties: oldest ULID first)."""
        return self._p + "electorate"

    @property
    def leader(self) -> str:
        return self._p + "leader"

    @property
    def events(self) -> str:
        return self._p + "events"

    # leases
    def router_lease(self, partition: int) -> str:
        return f"{self._p}router.lease.{partition}"

    @property
    def routers(self) -> str:
        return self._p + "routers"

    @property
    def beat_lease(self) -> str:
        return self._p + "beat.lease"

    @property
    def up_lock(self) -> str:
        """Held by the ``sidecar up`` running on the namespace (one at a time)."""
        return self._p + "up"

    @property
    def throttled(self) -> str:
        """Peers held back by their rate now (hash: peer id -> seconds until read again)."""
        return self._p + "throttled"

    @property
    def bridge_lease(self) -> str:
        """Token of the site's active NATS bridge."""
        return self._p + "bridge.lease"

    @property
    def bridge_applied(self) -> str:
        """The last JetStream stream sequence the site's bridge delivered here (written with the
        deliveries, atomically: what it is past is never delivered twice)."""
        return self._p + "bridge.applied"

    @property
    def bridge_stream(self) -> str:
        """When the stream whose sequences ``bridge_applied`` counts was created (a stream
        created again numbers from 1 again)."""
        return self._p + "bridge.stream"

    @property
    def site_name(self) -> str:
        """The name of the site this Redis is (every bridge on it must agree)."""
        return self._p + "site"

    @property
    def sites(self) -> str:
        """Every site of the federated cluster, as this site's bridge last saw them on NATS."""
        return self._p + "sites"

    @property
    def stats(self) -> str:
        return self._p + "stats"

    @property
    def histograms(self) -> str:
        """Routers' batch sizes and fan-out latencies, per bucket (coordinator.histogram)."""
        return self._p + "histograms"

    @property
    def bridge_traffic(self) -> str:
        """Messages the site's bridge sent to NATS (``exported``) and delivered here from each
        other site (``imported <site>``)."""
        return self._p + "bridge.traffic"

    # policies
    @property
    def policy_docs(self) -> str:
        return self._p + "policy.docs"

    @property
    def policy_sent(self) -> str:
        return self._p + "policy.sent"

    def policy_history(self, name: str) -> str:
        return f"{self._p}policy.history.{name}"

    @property
    def policy_version(self) -> str:
        return self._p + "policy.version"

    @property
    def policy_acks(self) -> str:
        return self._p + "policy.acks"

    @property
    def identities(self) -> str:
        return self._p + "identities"

    @property
    def nonces(self) -> str:
        return self._p + "nonces"

    def peer_storage(self, peer_id: str) -> str:
        """Root of ``peer_id``'s own key-value storage (every key of it starts with this)."""
        return f"{self._p}peer.{peer_id}."

    # other systems
    @property
    def celery_prefix(self) -> str:
        """Key prefix for Celery's broker and result keys."""
        return f"sidecar-celery:{{{self.namespace}}}:"

    def subject(self, topic: str) -> str:
        """NATS subject of ``topic`` for plain NATS clients (the stream republishes there)."""
        return f"{self.namespace}.{topic}"

    def stream_subject(self, topic: str) -> str:
        """NATS subject a site's bridge sends ``topic`` to, stored by the namespace's stream."""
        return f"_SIDECAR.{self.namespace}.msg.{topic}"

    def plain_subject(self, topic: str) -> str:
        """NATS subject a bridge puts a plain NATS client's message on ``topic`` in the stream
        with (not republished: its subscribers had it from the client already)."""
        return f"_SIDECAR.{self.namespace}.plain.{topic}"

    def topic_of(self, subject: str) -> str | None:
        """The topic a NATS subject carries (plain or stream subject), or None for a subject
        outside the namespace."""
        for prefix in (f"_SIDECAR.{self.namespace}.msg.", f"_SIDECAR.{self.namespace}.plain.",
                       self.namespace + "."):
            if subject.startswith(prefix):
                return subject[len(prefix):]
        return None

    @property
    def stream_name(self) -> str:
        """The namespace's JetStream stream."""
        return f"SIDECAR_{self.namespace}"

    @staticmethod
    def durable(site: str) -> str:
        """The durable consumer ``site`` reads the stream with."""
        return f"site_{site}"

    @property
    def bucket(self) -> str:
        """The namespace's key-value bucket: each site's record and the cluster-wide leader."""
        return f"sidecar_{self.namespace}"

    def reply_subject(self, site: str) -> str:
        """Where answers for the requests of ``site``'s peers travel (core NATS, not the stream)."""
        return f"_SIDECAR.{self.namespace}.reply.{site}"

    def partition_of_stream(self, stream: str, partitions: int) -> int:
        """The partition a request stream (a partition's, a peer's own, or the system stream:
        partition 0) belongs to, of ``partitions``."""
        if stream in (self._p + "sidecar.requests", self._p + "sidecar.system"):
            return 0
        peer = self.peer_of_stream(stream)
        if peer is not None:
            return self.partition_of(peer, partitions)
        return int(stream.rsplit(".", 1)[-1])

    def peer_of_stream(self, stream: str) -> str | None:
        """The peer whose own request stream ``stream`` is (None: not a peer's own)."""
        prefix = self._p + PEER_REQUESTS
        return stream[len(prefix):] if stream.startswith(prefix) else None

    def is_request_stream(self, stream: str, partitions: int) -> bool:
        """``stream`` is a partition's request stream or a peer's own."""
        return (self.peer_of_stream(stream) is not None
                or stream in (self.requests(p) for p in range(partitions)))

    @staticmethod
    def partition_of(sender: str, partitions: int) -> int:
        """The request partition ``sender`` always writes to (stable across processes)."""
        if partitions <= 1:
            return 0
        return zlib.crc32(sender.encode()) % partitions
