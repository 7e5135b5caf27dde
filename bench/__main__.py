"""``python -m bench [--quick] [--out PATH]``: run the suite, print the table, write the results."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bench import DEFAULT_RESULTS

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when it ran (targets missed or not), 1 when nothing ran."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="every scenario with tiny counts (checks the benchmark code path)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS,
                        help=f"results file (default: {DEFAULT_RESULTS})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    from bench.plan import FULL, QUICK
    from bench.report import render_table, write_results
    from bench.runner import Run

    results = Run(QUICK if args.quick else FULL).execute()
    write_results(args.out, results)
    print(render_table(results))
    print(f"\nresults written to {args.out} (wall time {results['wall_time_s']:.1f}s)")
    figures = [v for v in results.values() if isinstance(v, int | float)]
    return 0 if any(v is not None for v in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
