"""NATS connection options and the namespace's JetStream stream, as the settings say.

nats-py is imported here and in the bridge only, so a sidecar without ``SIDECAR_NATS_URL`` never
loads it.
"""

from __future__ import annotations

import ssl
from typing import Any

from coordinator.keys import Keys
from coordinator.settings import Settings

__all__ = ["connect_options", "ensure_stream", "stream_config"]


def connect_options(settings: Settings, *, name: str) -> dict[str, Any]:
    """Keyword arguments of ``nats.connect`` for ``settings`` (several servers: comma-separated
    URLs). Reconnects forever: a NATS outage pauses federation, it never ends the process."""
    if not settings.nats_url:
        raise ValueError("no NATS URL: set SIDECAR_NATS_URL")
    options: dict[str, Any] = {
        "servers": [u.strip() for u in settings.nats_url.split(",") if u.strip()],
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.25,
        "connect_timeout": 2,
    }
    if settings.nats_creds:
        options["user_credentials"] = settings.nats_creds
    if settings.nats_token:
        options["token"] = settings.nats_token
    if settings.nats_tls_ca or settings.nats_tls_cert:
        context = ssl.create_default_context(cafile=settings.nats_tls_ca)
        if settings.nats_tls_cert:
            context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
        options["tls"] = context
    return options


def stream_config(keys: Keys, settings: Settings) -> Any:
    """The namespace's stream: every site's messages (republished on ``<namespace>.<topic>`` for
    plain NATS subscribers) and plain NATS clients' messages, kept within the limits of
    ``settings``."""
    from nats.js.api import DiscardPolicy, RePublish, RetentionPolicy, StorageType, StreamConfig

    source = keys.stream_subject(">")
    return StreamConfig(name=keys.stream_name, subjects=[source, keys.plain_subject(">")],
                        retention=RetentionPolicy.LIMITS,
                        discard=DiscardPolicy.OLD, storage=StorageType.FILE,
                        max_age=settings.nats_stream_max_age,
                        max_bytes=settings.nats_stream_max_bytes,
                        num_replicas=settings.nats_stream_replicas,
                        duplicate_window=settings.nats_duplicate_window,
                        republish=RePublish(src=source, dest=keys.subject(">")))


async def ensure_stream(js: Any, keys: Keys, settings: Settings) -> None:
    """Create the namespace's stream, or bring an existing one to the configured limits."""
    from nats.js.errors import NotFoundError

    config = stream_config(keys, settings)
    try:
        await js.stream_info(keys.stream_name)
    except NotFoundError:
        await js.add_stream(config)
    else:
        await js.update_stream(config)
