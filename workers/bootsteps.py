"""Worker bootstep hosting one ClusterSidecar (its router) for the worker's lifetime."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

__all__ = ["RouterStep"]

log = logging.getLogger("sidecar.worker")


class RouterStep(bootsteps.StartStopStep):
    """Starts routing when the worker starts and releases the router's leases when it stops."""

    label = "sidecar router"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.sidecar: Any = None

    def start(self, parent: Any) -> None:
        from coordinator.sidecar import ClusterSidecar
        from workers.application import settings

        self.sidecar = ClusterSidecar(settings=settings, run_duties=False,  # beat runs those
                                      name=f"{getattr(parent, 'hostname', 'worker')}")
        self.sidecar.start()
        log.info("sidecar router %s started for namespace %r", self.sidecar.router.name,
                 settings.namespace)

    def stop(self, parent: Any) -> None:
        if self.sidecar is not None:
            self.sidecar.stop()
            self.sidecar = None

    shutdown = stop
