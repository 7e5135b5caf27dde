"""Keep Flower on loopback unless it has credentials.

Flower listens on every interface by default. When ``celery -A workers flower`` starts, this moves
a default address to 127.0.0.1 and refuses a non-loopback address without ``--basic-auth`` (or
OAuth), so the task UI, which can revoke tasks and shut workers down, is never open by accident.
"""

from __future__ import annotations

import ipaddress
import logging
import sys

__all__ = ["check_flower_options", "install"]

log = logging.getLogger("sidecar.flower")


def _is_loopback(address: str) -> bool:
    if address in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_flower_options(options: object) -> None:
    """Adjust or refuse Flower's parsed options (see module docstring)."""
    address = str(getattr(options, "address", "") or "")
    has_auth = bool(getattr(options, "basic_auth", None) or getattr(options, "auth", None))
    if has_auth or _is_loopback(address):
        return
    if not address:
        options.address = "127.0.0.1"  # type: ignore[attr-defined]
        log.warning("Flower bound to 127.0.0.1; pass --basic-auth=user:password to listen elsewhere")
        return
    sys.exit(f"refusing to start Flower on {address} without credentials: pass "
             "--basic-auth=user:password (or --address=127.0.0.1)")


def install() -> None:
    """Register the check with Flower's option parser (when Flower is what is starting)."""
    try:
        from tornado.options import options
    except ImportError:
        return
    options.add_parse_callback(lambda: check_flower_options(options))
