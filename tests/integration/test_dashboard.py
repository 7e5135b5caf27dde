"""The dashboard: loopback by default, credentials required elsewhere, JSON and HTML views."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from coordinator.cluster.membership import Membership
from coordinator.errors import ConfigurationError
from coordinator.keys import Keys
from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar
from ops.dashboard import make_server
from tests.support import serve_http as serve
from tests.support import wait_for


@pytest.fixture
def open_dashboard(settings: Settings) -> Iterator[str]:
    yield from serve(make_server(settings))


def test_status_json_lists_members(open_dashboard: str, settings: Settings, client: redis.Redis) -> None:
    Membership(client, Keys(settings.namespace)).register("01TESTPEER0000000000000000", role="probe")
    with urllib.request.urlopen(open_dashboard + "/api/status", timeout=5) as resp:
        data = json.load(resp)
    assert data["cluster_size"] == 1
    assert data["members"][0]["role"] == "probe"
    with urllib.request.urlopen(open_dashboard + "/", timeout=5) as resp:
        page = resp.read().decode()
    assert settings.namespace in page and 'id="peers"' in page and "/api/status" in page
    with urllib.request.urlopen(open_dashboard + "/api/events", timeout=5) as resp:
        assert any(e.get("peer") == "01TESTPEER0000000000000000" for e in json.load(resp))


def test_non_loopback_without_credentials_is_refused(settings: Settings) -> None:
    with pytest.raises(ConfigurationError, match="only with credentials"):
        make_server(settings, host="0.0.0.0")


def test_credentials_are_required_when_set(settings: Settings) -> None:
    secured = settings.replace(dashboard_user="ops", dashboard_password="pa55word")
    for base in serve(make_server(secured)):
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(base + "/api/status", timeout=5)
        assert denied.value.code == 401
        denied.value.close()
        token = base64.b64encode(b"ops:pa55word").decode()
        request = urllib.request.Request(base + "/api/status", headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert json.load(resp)["namespace"] == settings.namespace


def test_a_malformed_authorization_header_gets_401_not_a_crash(settings: Settings) -> None:
    import http.client

    secured = settings.replace(dashboard_user="ops", dashboard_password="pa55word")
    for base in serve(make_server(secured)):
        host, port = base.removeprefix("http://").split(":")
        for header in ("Basic \u00e9\u00e8\u00ea", "Bearer x", "Basic", "Basic !!!not base64"):
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            conn.putrequest("GET", "/api/status")
            conn.putheader("Authorization", header.encode("latin-1"))
            conn.endheaders()
            response = conn.getresponse()
            assert response.status == 401, header
            response.read()
            conn.close()


def test_metrics_scrape_as_prometheus_reads_them(settings: Settings, client: redis.Redis) -> None:
    import asyncio

    from prometheus_client.parser import text_string_to_metric_families

    from coordinator.sidecar import ClusterSidecar
    from tests.support import Peer, async_wait_for

    keys = Keys(settings.namespace)

    routed = settings.replace(data_path="routed")  # through the router: its histograms fill

    async def traffic() -> None:
        sc = ClusterSidecar(settings=routed)
        await sc.setup()
        try:
            async with Peer(settings=routed) as a, Peer(settings=routed) as b:
                got: list[object] = []
                await b.cluster_subscribe("m.>", got.append)
                for n in range(5):
                    await a.cluster_publish("m.x", n)
                await async_wait_for(lambda: len(got) == 5, what="five deliveries")
                await async_wait_for(lambda: int(client.hget(keys.stats, "delivered") or 0) >= 5,
                                     what="the counters flushed with a heartbeat")
                await async_wait_for(lambda: client.hget(keys.leader, "id"), what="a leader elected")
                client.xadd(keys.deadletter, {"reason": "handler_failed", "message": "boom"})
                for base in serve(make_server(settings)):
                    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
                        assert resp.headers["Content-Type"].startswith("text/plain")
                        text = resp.read().decode()
                    families = {f.name: f for f in text_string_to_metric_families(text)}
                    value = {(s.name, tuple(sorted(s.labels.items()))): s.value
                             for f in families.values() for s in f.samples}
                    assert families["sidecar_messages_delivered"].type == "counter"
                    assert value[("sidecar_messages_delivered_total", ())] >= 5
                    assert value[("sidecar_cluster_size", ())] == 2
                    assert value[("sidecar_leader_term", ())] >= 1
                    assert value[("sidecar_dead_letters", (("reason", "handler_failed"),))] == 1
                    assert ("sidecar_inbox_length", (("peer", b.id),)) in value
                    assert sum(value[("sidecar_peers_policy", (("state", s),))]
                               for s in ("synced", "stale", "nacked", "none")) == 2  # every live peer
                    for name in ("sidecar_router_batch_size", "sidecar_router_fanout_seconds"):
                        assert families[name].type == "histogram"
                        count = value[(f"{name}_count", ())]
                        assert count >= 1 and value[(f"{name}_bucket", (("le", "+Inf"),))] == count
                    assert value[("sidecar_router_fanout_seconds_count", ())] >= 5  # one per publish
                    assert value[("sidecar_router_batch_size_sum", ())] >= 5  # every entry was read
        finally:
            await sc.teardown()

    asyncio.run(traffic())


def test_dead_letters_replay_only_with_credentials_from_the_page_itself(
        settings: Settings, client: redis.Redis) -> None:
    from coordinator.routing.rejections import deadletter_entry

    keys = Keys(settings.namespace)
    peer = "01REPLAYPEER00000000000000"
    Membership(client, keys).register(peer)
    letter = client.xadd(keys.deadletter, deadletter_entry(
        "handler_failed", "boom", stream="inbox", entry="01MSG0000000000000000000AB", peer=peer,
        topic="a.b", raw='{"x": 1}', sender="01SENDER"))
    token = base64.b64encode(b"ops:pa55word").decode()

    def post(base: str, path: str, **headers: str) -> int:
        request = urllib.request.Request(base + path, data=b"", method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)

    replay = f"/api/deadletters/{letter}/replay"
    for base in serve(make_server(settings)):  # no credentials set: nothing changes from here
        assert post(base, replay, **{"X-Sidecar-Action": "replay"}) == 403
        with urllib.request.urlopen(base + "/api/deadletters", timeout=5) as resp:
            assert [d["id"] for d in json.load(resp)] == [letter]
    secured = settings.replace(dashboard_user="ops", dashboard_password="pa55word")
    for base in serve(make_server(secured)):
        auth = {"Authorization": f"Basic {token}"}
        assert post(base, replay, **{"X-Sidecar-Action": "replay"}) == 401  # no credentials
        assert post(base, replay, **auth) == 403  # a plain form post (no custom header)
        assert post(base, replay, **auth, **{"X-Sidecar-Action": "replay",
                                             "Origin": "http://evil.example"}) == 403
        assert client.xlen(keys.deadletter) == 1
        assert post(base, replay, **auth, **{"X-Sidecar-Action": "replay"}) == 200
        assert client.xlen(keys.deadletter) == 0
        assert any(f.get("i") == "01MSG0000000000000000000AB"
                   for _, f in client.xrange(keys.responses(peer)))
        assert post(base, replay, **auth, **{"X-Sidecar-Action": "replay"}) == 404  # gone


def test_workers_and_leadership_history(settings: Settings, client: redis.Redis) -> None:
    """/api/workers names the router holding each partition; /api/leadership keeps every term."""
    sidecar = ClusterSidecar(settings=settings, name="router-under-test")
    sidecar.start()
    membership = Membership(client, Keys(settings.namespace))
    try:
        for base in serve(make_server(settings)):
            membership.register("01FIRST0000000000000000000", role="a", priority=5)
            first = wait_for(lambda: client.hget(Keys(settings.namespace).leader, "id"),
                             what="a leader")
            membership.register("01SECOND000000000000000000", role="b")
            membership.leave(str(first))
            wait_for(lambda old=first: client.hget(Keys(settings.namespace).leader, "id") not in (None, old),
                     what="the next leader")
            history = wait_for(lambda url=base: len(h := get(url, "/api/leadership")) >= 2 and h)
            assert [h["leader_id"] for h in history[-2:]] == [first, "01SECOND000000000000000000"]
            assert history[-1]["leader_term"] > history[-2]["leader_term"]
            assert history[-1]["previous"] == first
            workers = get(base, "/api/workers")
            assert [(r["name"], r["partitions"]) for r in workers["routers"]] == [
                ("router-under-test", list(range(settings.partitions)))]
            holder = workers["partitions"][0]["holder"]
            assert holder["name"] == "router-under-test" and holder["expires_in_s"] > 0
            status = get(base, "/api/status")
            assert [m["leader"] for m in status["members"]] == [True]
    finally:
        sidecar.stop()


def get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=5) as resp:
        return json.load(resp)


def test_healthz_needs_no_credentials_and_says_when_redis_is_away(settings: Settings) -> None:
    secured = settings.replace(dashboard_user="ops", dashboard_password="pa55word")
    for base in serve(make_server(secured)):
        with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
            assert resp.read() == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as denied:  # everything else still needs them
            urllib.request.urlopen(base + "/api/workers", timeout=5)
        assert denied.value.code == 401
        denied.value.close()
    from ops.embedded import free_port

    away = settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    for base in serve(make_server(away)):
        with pytest.raises(urllib.error.HTTPError) as down:
            urllib.request.urlopen(base + "/healthz", timeout=5)
        assert down.value.code == 503
        down.value.close()


def test_the_page_cannot_be_framed_and_its_json_is_standard(open_dashboard: str, client: redis.Redis,
                                                            settings: Settings) -> None:
    keys = Keys(settings.namespace)
    Membership(client, keys).register("01FRAMED000000000000000000", role="probe")
    client.hset(keys.member("01FRAMED000000000000000000"), "status", '{"rate": NaN}')  # as written raw
    for path in ("/", "/api/status", "/healthz"):
        with urllib.request.urlopen(open_dashboard + path, timeout=5) as resp:
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
            body = resp.read().decode()
    with urllib.request.urlopen(open_dashboard + "/api/status", timeout=5) as resp:
        status = json.loads(resp.read(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert status["members"][0]["status"] == {}  # NaN is not JSON: shown as nothing
    assert body == "ok\n"
