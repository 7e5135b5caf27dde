"""Framework-free core of the sidecar: settings, keys, scripts, routing, membership, status.

``from coordinator import ClusterSidecar, Settings``.
"""

from coordinator.errors import (
    BadRequest,
    ConfigurationError,
    InvalidTopic,
    NotLeader,
    PayloadTooLarge,
    PolicyRejected,
    SidecarError,
    SidecarTimeout,
    SidecarUnavailable,
    UnknownPeer,
)
from coordinator.keys import Keys
from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar

__all__ = [
    "BadRequest",
    "ClusterSidecar",
    "ConfigurationError",
    "InvalidTopic",
    "Keys",
    "NotLeader",
    "PayloadTooLarge",
    "PolicyRejected",
    "Settings",
    "SidecarError",
    "SidecarTimeout",
    "SidecarUnavailable",
    "UnknownPeer",
]
