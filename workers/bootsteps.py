"""Worker bootsteps: one ClusterSidecar (its router) and, with ``SIDECAR_NATS_URL``, the site's NATS
bridge, for the worker's lifetime.

The step reads the sidecar settings of the worker's own app (``parent.app.sidecar_settings``, see
workers.application), as Celery's steps read ``parent.app.conf``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from coordinator.sidecar import ClusterSidecar

__all__ = ["BridgeStep", "RouterStep"]

log = logging.getLogger("sidecar.worker")


class RouterStep(bootsteps.StartStopStep):
    """Starts routing when the worker starts and releases the router's leases when it stops."""

    label = "sidecar router"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.sidecar: ClusterSidecar | None = None

    def start(self, parent: Any) -> None:
        settings = parent.app.sidecar_settings
        sidecar = ClusterSidecar(settings=settings, run_duties=False,  # beat runs those
                                 run_bridge=False,  # BridgeStep's
                                 name=f"{getattr(parent, 'hostname', 'worker')}")
        sidecar.start()
        self.sidecar = sidecar
        log.info("sidecar router %s started for namespace %r", sidecar.router.name,
                 settings.namespace)

    def stop(self, parent: Any) -> None:
        if self.sidecar is not None:
            self.sidecar.stop()
            self.sidecar = None

    shutdown = stop


class BridgeStep(bootsteps.StartStopStep):
    """Runs the site's NATS bridge (one active per site, the others standing by) while
    ``SIDECAR_NATS_URL`` is set; without it the step does nothing and NATS is never imported."""

    label = "sidecar NATS bridge"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.bridge: Any = None

    def start(self, parent: Any) -> None:
        settings = parent.app.sidecar_settings
        if not settings.nats_url:
            return
        from coordinator.federation.bridge import BridgeThread

        self.bridge = BridgeThread(settings, name=f"{getattr(parent, 'hostname', 'worker')}")
        self.bridge.start()
        log.info("sidecar bridge %s standing by for site %r", self.bridge.bridge.name, settings.site)

    def stop(self, parent: Any) -> None:
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None

    shutdown = stop
