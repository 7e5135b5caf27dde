"""The seed's ``SidecarConductor`` and its follower, as a checkout runs them::

    python -m examples.sidecar_conductor conductor
    python -m examples.sidecar_conductor follower --nudge-every 5

They live in :mod:`ops.demo` (read it there), which the package installs so ``sidecar up`` finds
them in a wheel too; from a wheel run ``python -m ops.demo`` instead.
"""

from __future__ import annotations

from ops.demo import SidecarConductor, SidecarFollower, main, run

__all__ = ["SidecarConductor", "SidecarFollower", "main", "run"]

if __name__ == "__main__":
    main()
