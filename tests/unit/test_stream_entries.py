"""An inbox read gives the same entries whichever connection made it: the lean RESP reply
(:func:`stream_entries`) and redis-py's RESP2 and RESP3 shapes (:func:`stream_entries_py`)."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.resp import stream_entries, stream_entries_py

EXPECTED = [("inbox", "1-0", {"k": "msg", "t": "a.b"}), ("inbox", "2-0", {}),
            ("inbox", "3-0", {"k": "rep"})]

LEAN = [["inbox", [["1-0", ["k", "msg", "t", "a.b"]], ["2-0", None], ["3-0", ["k", "rep"]]]]]
"""As hiredis parses it: a trimmed entry still pending comes back as its id and nil."""

RESP2 = [["inbox", [("1-0", {"k": "msg", "t": "a.b"}), ("2-0", None), ("3-0", {"k": "rep"})]]]
RESP3 = {"inbox": [[("1-0", {"k": "msg", "t": "a.b"}), ("2-0", None), ("3-0", {"k": "rep"})]]}


def test_the_lean_reply_gives_every_entry_in_order() -> None:
    assert stream_entries(LEAN) == EXPECTED


@pytest.mark.parametrize("reply", [RESP2, RESP3], ids=["resp2", "resp3"])
def test_redis_py_replies_give_the_same_entries(reply: Any) -> None:
    assert stream_entries_py(reply) == EXPECTED


@pytest.mark.parametrize("reply", [None, [], {}, [["inbox", []]], {"inbox": [[]]}],
                         ids=["nil", "empty-list", "empty-dict", "resp2-none-pending",
                              "resp3-none-pending"])
def test_a_read_with_nothing_gives_no_entries(reply: Any) -> None:
    assert stream_entries_py(reply) == []
    if not isinstance(reply, dict):
        assert stream_entries(reply) == []
