"""Turning measurements into ``results.json`` and a readable table.

The results file is one JSON object whose top level holds named numbers only; four nested objects
carry the rest: ``targets`` (each target with the measured value and whether it passed), ``notes``
(which anchor a figure stands on, or why it has no target: legacy figures kept beside the honest
ones), ``runs`` (every repetition behind a median) and ``meta`` (plan, the fastest raw hop, every
dual-leader overlap, errors, timestamps).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.plan import TARGETS

__all__ = ["median", "percentile", "ratio", "render_table", "targets_section", "write_results"]

def median(values: Iterable[float]) -> float | None:
    """Median of ``values``, or None when there are none."""
    data = list(values)
    return statistics.median(data) if data else None


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation, or None for no values."""
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def ratio(top: float | None, bottom: float | None) -> float | None:
    """``top / bottom``, or None when either is missing or ``bottom`` is zero."""
    if top is None or not bottom:
        return None
    return top / bottom


def targets_section(figures: Mapping[str, float | None]) -> dict[str, dict[str, Any]]:
    """Each target of the issue with the measured value and ``pass`` (false when missing)."""
    return {t.figure: {"op": t.op, "value": t.value, "measured": figures.get(t.figure),
                       "pass": t.check(figures.get(t.figure))} for t in TARGETS}


def _unit(name: str) -> str:
    if name.endswith("_per_s"):
        return "/s"
    if name.endswith("_us") or name.startswith(("match_us_", "cpu_us_")):
        return "us"
    if name.endswith("_ms"):
        return "ms"
    if "bytes" in name or "memory" in name:
        return "B"
    if name.endswith("_s"):
        return "s"
    if "_vs_" in name or "ratio" in name:
        return "x"
    return ""


def _fmt(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:,.3f}"
    return f"{value:,.0f}"


def render_table(results: Mapping[str, Any]) -> str:
    """Every top-level figure with its unit, the target and verdict where the issue sets one, and
    its note (the anchor it stands on, or ``legacy``); then every dual-leader overlap."""
    targets = results.get("targets", {})
    notes = results.get("notes", {})
    rows = [("figure", "value", "unit", "target", "verdict", "note")]
    for name, value in results.items():
        if isinstance(value, dict | list):
            continue
        t = targets.get(name)
        target = f"{t['op']} {t['value']:g}" if t else ""
        verdict = ("PASS" if t["pass"] else "MISSED") if t else ""
        rows.append((name, _fmt(value), _unit(name), target, verdict, str(notes.get(name, ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if 0 < i < 3 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    passed = sum(1 for t in targets.values() if t["pass"])
    missed = [name for name, t in targets.items() if not t["pass"]]
    lines.append(f"\ntargets met: {passed} of {len(targets)}"
                 + (f"; missed: {', '.join(missed)}" if missed else ""))
    meta = results.get("meta", {})
    overlaps = meta.get("dual_leader_overlaps", [])
    lines.append(f"dual-leader belief overlaps: {len(overlaps)}")
    for o in overlaps:
        lines.append(f"  {o['run']}: terms {o['terms'][0]}->{o['terms'][1]} "
                     f"{o['length_ms']:.1f} ms ({o['after_successor_start_ms']:.1f} ms after the "
                     f"successor's start; TTL {o['ttl_s'] * 1e3:.0f} ms; outside it "
                     f"{o['outside_ttl_ms']:.1f} ms)")
    errors = meta.get("errors", [])
    if errors:
        lines.append(f"scenario failures: {len(errors)} (see meta.errors in the results file)")
    return "\n".join(lines)


def write_results(path: Path, results: Mapping[str, Any]) -> None:
    """Write ``results`` as indented JSON (creating the folder if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
