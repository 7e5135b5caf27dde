"""One error tree for the whole sidecar.

Every error the sidecar raises on purpose derives from :class:`SidecarError`. Each carries a fixed
``code`` (used on the wire in error replies, so a peer can rebuild the same exception type) and a
message that says what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "BadRequest",
    "ConfigurationError",
    "InternalError",
    "InvalidHeaders",
    "InvalidPolicy",
    "InvalidTopic",
    "NoResponders",
    "NotLeader",
    "PayloadTooLarge",
    "PolicyRejected",
    "RemoteError",
    "RequestTimeout",
    "SidecarError",
    "SidecarTimeout",
    "SidecarUnavailable",
    "UnknownPeer",
    "error_from_code",
]


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""

    code = "sidecar_error"


class ConfigurationError(SidecarError, ValueError):
    """A setting is missing, malformed or inconsistent with another one."""

    code = "configuration"


class InvalidTopic(SidecarError, ValueError):
    """A topic or subscription pattern breaks the NATS subject grammar, or is reserved."""

    code = "invalid_topic"


class BadRequest(SidecarError, ValueError):
    """A request entry could not be understood (not JSON, missing fields, unknown kind)."""

    code = "bad_request"


class PayloadTooLarge(BadRequest):
    """A publish carried more bytes than ``Settings.max_payload_bytes`` allows."""

    code = "payload_too_large"


class InvalidHeaders(BadRequest):
    """Message headers must be a small mapping of header names to strings; the message says how."""

    code = "invalid_headers"


class InvalidPolicy(BadRequest):
    """A policy document is malformed; the message names the field."""

    code = "invalid_policy"


class AuthenticationFailed(SidecarError):
    """A request was unsigned, badly signed, stale or replayed; check the peer's id and secret."""

    code = "unauthenticated"


class UnknownPeer(SidecarError):
    """A request named a peer that is not a registered member; register (``setup()``) first."""

    code = "unknown_peer"


class NotLeader(SidecarError):
    """A fenced action came from a peer that is not the leader of the current term."""

    code = "not_leader"


class PolicyRejected(SidecarError):
    """The policy in force denies this action."""

    code = "policy_rejected"


class InternalError(SidecarError):
    """The router failed on a request in a way it did not foresee; the request is dead-lettered."""

    code = "internal_error"


class SidecarUnavailable(SidecarError, ConnectionError):
    """The sidecar's Redis cannot be reached and the local buffer is full; retry later."""

    code = "unavailable"


class SidecarTimeout(SidecarError, TimeoutError):
    """The sidecar did not answer a control request in time; is a worker running?"""

    code = "timeout"


class NoResponders(SidecarError):
    """A request went to a topic nobody is subscribed to (answered at once, as NATS does)."""

    code = "no_responders"


class RequestTimeout(SidecarTimeout):
    """No answer to a request came within its timeout."""

    code = "request_timeout"


class RemoteError(SidecarError):
    """The handler that took a request raised; the message is its error text."""

    code = "remote_error"


_BY_CODE: dict[str, type[SidecarError]] = {
    cls.code: cls
    for cls in (
        SidecarError,
        ConfigurationError,
        InvalidTopic,
        BadRequest,
        PayloadTooLarge,
        UnknownPeer,
        NotLeader,
        PolicyRejected,
        SidecarUnavailable,
        SidecarTimeout,
        InvalidPolicy,
        InvalidHeaders,
        AuthenticationFailed,
        InternalError,
        NoResponders,
        RequestTimeout,
        RemoteError,
    )
}


def error_from_code(code: str, message: str) -> SidecarError:
    """Rebuild the exception a router reported by ``code`` (unknown codes give a SidecarError)."""
    return _BY_CODE.get(code, SidecarError)(message)
