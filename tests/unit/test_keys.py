"""The key builder: the fixed key names other processes and the checks rely on."""

from __future__ import annotations

import zlib
from collections import Counter

import pytest

from coordinator.keys import PEER_GROUP, REQUEST_GROUP, Keys


def test_data_plane_key_names() -> None:
    k = Keys("ns")
    assert k.requests(0) == "sidecar:{ns}:sidecar.requests"
    assert k.requests() == "sidecar:{ns}:sidecar.requests"
    assert k.requests(3) == "sidecar:{ns}:sidecar.requests.3"
    assert k.responses("P") == "sidecar:{ns}:sidecar.responses.P"
    assert k.responses("P").startswith(k.responses_prefix)
    assert k.deadletter == "sidecar:{ns}:deadletter"
    assert k.system == "sidecar:{ns}:sidecar.system"
    assert k.subs == "sidecar:{ns}:subs"
    assert k.routing_version == "sidecar:{ns}:routing.version"


def test_membership_and_lease_key_names() -> None:
    k = Keys("ns")
    assert k.members == "sidecar:{ns}:members"
    assert k.member("P") == "sidecar:{ns}:member.P"
    assert k.leader == "sidecar:{ns}:leader"
    assert k.events == "sidecar:{ns}:events"
    assert k.router_lease(0) == "sidecar:{ns}:router.lease.0"
    assert k.routers == "sidecar:{ns}:routers"
    assert k.beat_lease == "sidecar:{ns}:beat.lease"
    assert k.stats == "sidecar:{ns}:stats"


def every_key(k: Keys) -> list[str]:
    """Every key the builder makes (found by introspection, so new keys are covered too)."""
    out = []
    for name, attr in vars(Keys).items():
        if name.startswith("_") or name in ("celery_prefix", "responses_prefix", "partition_of",
                                            "partition_of_stream", "peer_of_stream", "is_request_stream",
                                            "subject", "namespace", "topic_of", "stream_name",
                                            "stream_subject", "durable", "reply_subject", "bucket",
                                            "plain_subject"):
            continue
        if isinstance(attr, property):
            out.append(getattr(k, name))
        elif callable(attr):
            out.append(getattr(k, name)("x" if name != "router_lease" else 1))
    return out


def test_every_key_shares_the_namespace_hash_tag() -> None:
    names = [*every_key(Keys("my-ns")), Keys("my-ns").requests(2)]
    assert len(names) >= 15
    assert len(set(names)) == len(names)
    for name in names:
        assert name.startswith("sidecar:{my-ns}:")


def test_nats_names_of_a_namespace() -> None:
    k = Keys("ns")
    assert k.subject("orders.created") == "ns.orders.created"
    assert k.topic_of("ns.orders.created") == "orders.created"
    assert k.topic_of("other.orders.created") is None
    assert k.topic_of(k.stream_subject("orders.created")) == "orders.created"
    assert k.topic_of(k.plain_subject("orders.created")) == "orders.created"
    assert not k.stream_subject("a").startswith("ns.")  # plain clients' requests stay out of it
    assert k.stream_name == "SIDECAR_ns"
    assert k.durable("east") == "site_east"
    assert not k.reply_subject("east").startswith("ns.")  # answers stay out of the stream


def test_namespaces_do_not_share_keys() -> None:
    assert Keys("a").subs != Keys("b").subs
    assert Keys("a").namespace == "a"


def test_celery_prefix_is_separate() -> None:
    k = Keys("ns")
    assert k.celery_prefix == "sidecar-celery:{ns}:"
    assert not k.celery_prefix.startswith("sidecar:")
    assert not k.subs.startswith(k.celery_prefix)


def test_nats_subject() -> None:
    assert Keys("ns").subject("a.b") == "ns.a.b"


def test_group_names() -> None:
    assert REQUEST_GROUP == "routers"
    assert PEER_GROUP == "peer"
    assert REQUEST_GROUP != PEER_GROUP


@pytest.mark.parametrize("partitions", [0, 1])
def test_single_partition_is_always_zero(partitions: int) -> None:
    assert {Keys.partition_of(f"peer{i}", partitions) for i in range(50)} == {0}


@pytest.mark.parametrize("partitions", [2, 3, 8])
def test_partition_of_is_stable_in_range_and_spread(partitions: int) -> None:
    senders = [f"01J{i:023d}" for i in range(400)]
    first = [Keys.partition_of(s, partitions) for s in senders]
    assert first == [Keys.partition_of(s, partitions) for s in senders]
    assert all(0 <= p < partitions for p in first)
    assert set(Counter(first)) == set(range(partitions))  # every partition gets senders


def test_partition_of_known_value() -> None:
    # crc32, not hash(): a sender's partition is the same in every process (no hash seed)
    assert Keys.partition_of("peer-a", 4) == zlib.crc32(b"peer-a") % 4
