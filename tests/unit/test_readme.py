"""The README's peer API reference names what the code has, so the two cannot drift apart silently:
every constructor option of a peer, every error class, every public method, property and hook."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import coordinator.errors
from coordinator.status import StatusMixin
from mixin import Agent, SidecarMixin
from mixin.agent import Lifecycle

README = Path(__file__).resolve().parents[2] / "README.md"


def section(title: str) -> str:
    """The text of the README's ``## <title>`` section."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def table_after(text: str, heading: str) -> set[str]:
    """The first column's names (in backticks) of the first table after ``heading``."""
    rows = []
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    names = {m.group(1) for row in rows[2:] if (m := re.match(r"\| `([A-Za-z_]+)` \|", row))}
    assert len(names) == len(rows) - 2, rows  # every row names one thing
    return names


def constructor_options() -> set[str]:
    names = set()
    for cls in (Agent, SidecarMixin):
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                names.add(p.name)
    return names


def test_the_reference_lists_exactly_the_constructor_options() -> None:
    documented = table_after(section("Peer API reference"), "**Constructor options**")
    assert documented == constructor_options()
    assert {"role", "priority", "labels", "leader_eligible", "redis_url", "id", "secret"} <= documented


def test_the_reference_lists_exactly_the_error_classes() -> None:
    exported = {name for name in coordinator.errors.__all__
                if inspect.isclass(getattr(coordinator.errors, name))}
    assert table_after(section("Peer API reference"), "**Errors.**") == exported


def test_the_reference_names_every_public_method_property_and_hook() -> None:
    text = section("Peer API reference")
    public = {name for cls in (Lifecycle, Agent, SidecarMixin, StatusMixin) for name in vars(cls)
              if not name.startswith("_")}
    missing = {name for name in public if not re.search(rf"`{name}[`(]", text)}
    assert not missing, f"not in the README's reference: {sorted(missing)}"
    assert "SidecarTimeout" in text and "registered" in text  # what `async with` waits for


def test_the_own_project_section_says_how_to_install_fix_the_id_and_set_log_levels() -> None:
    text = section("Use it from your own project")
    assert "pip install" in text and "`id=`" in text and "SIDECAR_LOG_LEVEL" in text
