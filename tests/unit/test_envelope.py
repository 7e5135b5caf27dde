"""How messages look on NATS: both ways, reserved headers, bad input refused with a reason."""

from __future__ import annotations

import json

import pytest

from coordinator.errors import BadRequest, InvalidHeaders
from coordinator.federation.directory import LeaderRecord, parse_site
from coordinator.federation.envelope import (
    ReplyRoute,
    answer_in,
    answer_out,
    inbound,
    ingest,
    origin_of,
    outbound,
)
from coordinator.keys import Keys
from coordinator.settings import Settings

KEYS = Keys("ns")
ENTRY = {"k": "msg", "i": "01J0000000000000000000000A", "t": "orders.created", "d": '{"n":1}',
         "s": "peer1", "h": json.dumps({"traceparent": "00-abc", "Sidecar-Site": "forged"}),
         "x": "1700000000000"}


def test_a_message_leaves_with_its_id_origin_sender_and_headers_and_comes_back_the_same() -> None:
    out = outbound(KEYS, "east", ENTRY)
    assert out.subject == KEYS.stream_subject("orders.created")
    assert out.headers["Nats-Msg-Id"] == ENTRY["i"] == out.msg_id
    assert out.headers["Sidecar-Site"] == "east"  # the publisher's own "Sidecar-Site" cannot forge it
    assert out.headers["Sidecar-Sender"] == "peer1" and out.headers["traceparent"] == "00-abc"
    back = inbound(KEYS, out.subject, out.payload, out.headers, 42, max_header_bytes=4096)
    assert back.reply is None
    assert back.entry == {"k": "fwd", "q": "42", "t": "orders.created", "d": '{"n":1}',
                          "h": '{"traceparent":"00-abc"}', "o": "east", "s": "peer1",
                          "i": ENTRY["i"], "x": "1700000000000"}
    assert origin_of(out.headers) == "east" and origin_of({}) == "nats"


def test_a_request_carries_its_way_back_and_its_answer_finds_the_requester() -> None:
    out = outbound(KEYS, "east", {**ENTRY, "rt": "peer1"})
    back = inbound(KEYS, out.subject, out.payload, out.headers, 7, max_header_bytes=4096)
    assert back.entry["rt"] == "1"
    assert back.reply == ReplyRoute(KEYS.reply_subject("east"), "peer1")
    payload, headers = answer_out({"k": "rep", "i": ENTRY["i"], "ok": "1", "d": '"pong"', "s": "p2"},
                                  back.reply)
    assert answer_in(headers, payload) == {"k": "rep", "to": "peer1", "ri": ENTRY["i"], "ok": "1",
                                           "d": '"pong"'}
    payload, headers = answer_out({"k": "rep", "i": ENTRY["i"], "ok": "0", "e": "boom"}, back.reply)
    assert answer_in(headers, payload) == {"k": "rep", "to": "peer1", "ri": ENTRY["i"], "ok": "0",
                                           "e": "boom"}


def test_a_plain_client_message_goes_into_the_stream_with_an_id_and_its_reply_subject() -> None:
    out = ingest(KEYS, "ns.conductor.set_tempo", b'{"bpm": 120}', {"x-trace": "t"}, "_INBOX.abc",
                 max_header_bytes=4096)
    assert out.subject == KEYS.plain_subject("conductor.set_tempo")
    assert out.headers["Sidecar-Reply-To"] == "_INBOX.abc" and out.headers["x-trace"] == "t"
    back = inbound(KEYS, out.subject, out.payload, out.headers, 9, max_header_bytes=4096)
    assert back.entry["s"] == back.entry["o"] == "nats" and back.entry["i"] == out.msg_id
    assert back.reply == ReplyRoute("_INBOX.abc", None)
    kept = ingest(KEYS, "ns.a", b"1", {"Nats-Msg-Id": "client-id-1"}, "", max_header_bytes=4096)
    assert kept.msg_id == "client-id-1"  # a plain client's own id is kept


@pytest.mark.parametrize(("subject", "payload", "headers", "error"), [
    ("other.topic", b"{}", {}, BadRequest),                            # outside the namespace
    ("ns.a", b"not json", {}, BadRequest),
    ("ns.a", b"\xff\xfe", {}, BadRequest),
    ("ns.a", b"{}", {"big": "x" * 5000}, InvalidHeaders),
    ("ns.a", b"{}", {"Sidecar-Site": "a b"}, BadRequest),              # not a site name
    ("ns.a", b"{}", {"Sidecar-Site": "b", "Sidecar-Sender": "x y"}, BadRequest),
    ("ns.a", b"{}", {"Sidecar-Site": "b", "Sidecar-Reply-To": "r", "Sidecar-Requester": "x y"},
     BadRequest),
])
def test_bad_input_is_refused_with_a_reason(subject: str, payload: bytes, headers: dict[str, str],
                                            error: type[Exception]) -> None:
    with pytest.raises(error):
        inbound(KEYS, subject, payload, headers, 1, max_header_bytes=4096)


def test_an_answer_that_names_no_request_is_refused() -> None:
    with pytest.raises(BadRequest):
        answer_in({"Sidecar-Ok": "1"}, b'"x"')
    with pytest.raises(BadRequest):
        answer_in({"Sidecar-Ok": "1", "Sidecar-Requester": "p", "Sidecar-Request-Id": "r"}, b"nope")


def test_leader_and_site_records_survive_garbage() -> None:
    record = LeaderRecord("peer1", "east", 3)
    assert LeaderRecord.decode(record.encode()) == record
    assert LeaderRecord.decode(b"garbage") is None and LeaderRecord.decode(None) is None
    assert parse_site('{"members": {"p": "peer"}, "reachable": true, "leader": "p"}') == {
        "members": {"p": "peer"}, "leader": "p", "bridge": None, "reachable": True}
    assert parse_site("not json") == {"members": {}, "leader": None, "bridge": None,
                                      "reachable": False}


def test_site_names_and_export_patterns_are_checked() -> None:
    assert Settings(site="east-1").site == "east-1"
    assert Settings().site is None  # the site's Redis (or the first bridge's host) names it
    for bad in ("a b", "x" * 33, "a.b"):
        with pytest.raises(ValueError, match="site"):
            Settings(site=bad)
    assert Settings(nats_export="orders.>, billing.*").export_patterns == ("orders.>", "billing.*")
    with pytest.raises(ValueError, match="nats_export"):
        Settings(nats_export="orders.>.x")
