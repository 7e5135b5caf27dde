"""A peer as your own project would write one: workers of a job board that share out the jobs.

    SIDECAR_REDIS_URL=redis://localhost:6379/0 python -m examples.job_board worker-1
    SIDECAR_REDIS_URL=redis://localhost:6379/0 python -m examples.job_board worker-2
    sidecar publish jobs.new '{"title": "plumber"}'

Each job goes to one worker of the queue group; a peer that sends it with ``cluster_request``
gets the worker's answer back.
Each worker's id is fixed (``id=`` its name), so a restarted worker finds the jobs that waited in
its inbox meanwhile. Stop it with Ctrl-C or SIGTERM (``docker stop``, ``systemctl stop``): it leaves
the cluster at once, and its jobs in flight go to the other workers.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from coordinator.logs import configure
from mixin import Agent, Message, SidecarMixin, StatusField

__all__ = ["JobWorker", "main"]


class JobWorker(Agent, SidecarMixin):
    """Takes jobs published to ``jobs.>``, one worker per job."""

    jobs_done = StatusField(0, doc="jobs this worker finished")

    async def take(self, message: Message) -> dict[str, Any]:
        self.jobs_done += 1
        self.logger.info("job %s from %s: %s", message.id, message.sender, message.data)
        return {"done": message.data, "by": self.id}


async def main(name: str) -> None:
    async with JobWorker(id=name, role="job-worker", labels={"app": "job-board"},
                         leader_eligible=False) as worker:  # returns once registered
        await worker.cluster_subscribe("jobs.>", worker.take, queue="workers")
        print("ready", worker.id, flush=True)
        await asyncio.Event().wait()  # until SIGTERM or Ctrl-C: the peer leaves, the process ends


if __name__ == "__main__":
    # the sidecar's log format (SIDECAR_LOG_FORMAT), at SIDECAR_LOG_LEVEL when set, else info
    configure(component="job-board", level=None if os.environ.get("SIDECAR_LOG_LEVEL") else "info")
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "job-worker-1"))
