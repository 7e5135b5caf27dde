"""Protocol helpers a peer uses on every message: JSON text and the Message it hands to handlers."""

from __future__ import annotations

import dataclasses
import math

import pytest

from coordinator.protocol import Message, dumps


def test_dumps_is_compact_unicode_and_refuses_what_json_cannot_carry() -> None:
    assert dumps({"a": [1, 2], "é": "ü"}) == '{"a":[1,2],"é":"ü"}'
    with pytest.raises(ValueError):
        dumps(math.nan)
    with pytest.raises(TypeError):
        dumps(object())


async def _answer(data: object) -> None:
    return None


@pytest.mark.parametrize("reply_to, queue, respond", [(None, None, None), ("req", "workers", _answer)])
def test_a_delivered_message_is_the_message_its_fields_make(reply_to: str | None, queue: str | None,
                                                             respond: object) -> None:
    fast = Message.delivered("a.b", {"x": 1}, "sender", "ID", 1.5, {"h": "v"}, reply_to, queue,
                             respond)  # type: ignore[arg-type]
    plain = Message("a.b", {"x": 1}, "sender", "ID", 1.5, headers={"h": "v"}, reply_to=reply_to,
                    queue=queue, _respond=respond)  # type: ignore[arg-type]
    assert fast == plain
    assert [getattr(fast, f.name) for f in dataclasses.fields(Message)] == \
        [getattr(plain, f.name) for f in dataclasses.fields(Message)]
    assert fast.site is None and fast.is_request is (reply_to is not None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.topic = "other"  # type: ignore[misc]
