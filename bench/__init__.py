"""The sidecar's benchmark suite: ``python -m bench`` (``make bench``) -> ``bench/results.json``.

Every figure is measured against real processes started for the run (a private ``redis-server`` and
``celery worker`` processes, peers in their own processes) and expressed next to the strongest
anchor a user would pick instead, measured in the same run with the same payload, alternating with
the figure, as medians of repetitions: the fastest of three raw Redis hops (redis-py asyncio,
redis-py sync with hiredis, the project's lean RESP connections; the quickest of them for latency),
a raw hop with as many pushes in flight as the pipelined route run, and the naive design (one
Celery task per message) at Celery's default configuration. Figures the benchmark used to carry
targets with are kept beside the honest ones, marked legacy. ``python -m bench --quick`` runs every
scenario with tiny counts, to check the benchmark's own code path.

Modules: :mod:`bench.plan` (counts, targets, notes), :mod:`bench.children` (the process harness),
:mod:`bench.raw`, :mod:`bench.route`, :mod:`bench.celery_anchor` (with :mod:`bench.celery_default`),
:mod:`bench.match`, :mod:`bench.memory`, :mod:`bench.ha` (with :mod:`bench.ha_peer` and
:mod:`bench.belief`), :mod:`bench.policy_conv` (the scenarios), :mod:`bench.services` (Redis and
workers), :mod:`bench.runner` (the schedule of one run) and :mod:`bench.report` (results and table).
"""

from pathlib import Path

__all__ = ["DEFAULT_RESULTS"]

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results.json"
"""Where ``python -m bench`` writes its results unless ``--out`` says otherwise."""
