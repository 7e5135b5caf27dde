"""What a peer application imports: ``from mixin import Agent, SidecarMixin, StatusMixin, StatusField``.

Nothing here imports Celery: a peer needs only Redis and this package.
"""

from coordinator.errors import (
    InvalidHeaders,
    InvalidTopic,
    NoResponders,
    NotLeader,
    PayloadTooLarge,
    PolicyRejected,
    RemoteError,
    RequestTimeout,
    SidecarError,
    SidecarTimeout,
    SidecarUnavailable,
    UnknownPeer,
)
from coordinator.protocol import Message
from coordinator.status import StatusField, StatusMixin
from mixin.agent import Agent
from mixin.sidecar import SidecarMixin
from mixin.storage import RedisMixin
from mixin.transport import NatsMixin

__all__ = [
    "Agent",
    "InvalidHeaders",
    "InvalidTopic",
    "Message",
    "NatsMixin",
    "NoResponders",
    "NotLeader",
    "PayloadTooLarge",
    "PolicyRejected",
    "RedisMixin",
    "RemoteError",
    "RequestTimeout",
    "SidecarError",
    "SidecarMixin",
    "SidecarTimeout",
    "SidecarUnavailable",
    "StatusField",
    "StatusMixin",
    "UnknownPeer",
]
