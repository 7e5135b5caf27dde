"""What a peer application imports: ``from mixin import Agent, SidecarMixin, StatusMixin, StatusField``.

Nothing here imports Celery: a peer needs only Redis and this package.
"""

from coordinator.errors import (
    InvalidTopic,
    NotLeader,
    SidecarError,
    SidecarTimeout,
    SidecarUnavailable,
)
from coordinator.protocol import Message
from coordinator.status import StatusField, StatusMixin
from mixin.agent import Agent
from mixin.sidecar import SidecarMixin

__all__ = [
    "Agent",
    "InvalidTopic",
    "Message",
    "NotLeader",
    "SidecarError",
    "SidecarMixin",
    "SidecarTimeout",
    "SidecarUnavailable",
    "StatusField",
    "StatusMixin",
]
