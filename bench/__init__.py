"""The sidecar's benchmark suite: ``python -m bench`` (``make bench``) -> ``bench/results.json``.

Every figure is measured against real processes started for the run (a private ``redis-server`` and
``celery -A workers worker`` processes, peers in their own processes) and expressed next to anchors
measured in the same run: a raw Redis one-hop (LPUSH/BLPOP with redis-py's asyncio client) and the
naive design (one Celery task per message). ``python -m bench --quick`` runs every scenario with
tiny counts, to check the benchmark's own code path.

Modules: :mod:`bench.plan` (counts and targets), :mod:`bench.children` (the process harness),
:mod:`bench.raw`, :mod:`bench.route`, :mod:`bench.celery_anchor`, :mod:`bench.match`,
:mod:`bench.memory` (the scenarios), :mod:`bench.services` (Redis and workers),
:mod:`bench.runner` (the schedule of one run) and :mod:`bench.report` (results and table).
"""

from pathlib import Path

__all__ = ["DEFAULT_RESULTS"]

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results.json"
"""Where ``python -m bench`` writes its results unless ``--out`` says otherwise."""
