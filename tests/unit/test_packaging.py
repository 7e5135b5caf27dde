"""The wheel a user installs: built without warnings, carrying every package and data file of the
source tree, and nothing named ``examples`` at the top level.

The wheel is built offline from a copy of the tree (``--no-build-isolation``: the virtualenv's
setuptools, which the test extra pins), so a stale ``build/`` folder cannot hide a missing file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("coordinator", "workers", "mixin", "ops")
"""The top-level packages the project installs."""
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                               ".*_cache", ".hypothesis", ".sidecar")


class Wheel:
    """A built wheel: its file names and text, and what the build printed."""

    def __init__(self, path: Path, log: str) -> None:
        self.path = path
        self.log = log
        with zipfile.ZipFile(path) as zf:
            self.names = set(zf.namelist())

    def text(self, suffix: str) -> str:
        """The text of the one file whose name ends with ``suffix``."""
        [name] = [n for n in self.names if n.endswith(suffix)]
        with zipfile.ZipFile(self.path) as zf:
            return zf.read(name).decode()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "out"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                           "--no-build-isolation", "--no-cache-dir", "-v", "-w", str(out)],
                          capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    [path] = out.glob("*.whl")
    return Wheel(path, log)


def _source_files(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern)
                  if p.is_file() and "__pycache__" not in p.parts)


def test_the_build_warns_about_neither_the_license_nor_the_packages(wheel: Wheel) -> None:
    assert "is deprecated" not in wheel.log, wheel.log
    assert "absent from the `packages` configuration" not in wheel.log, wheel.log
    assert "BuildBackendWarning" not in wheel.log, wheel.log


def test_every_package_and_module_of_the_tree_is_in_the_wheel(wheel: Wheel) -> None:
    packages = [str(p.parent.relative_to(ROOT)) for top in SHIPPED for p in (ROOT / top).rglob("__init__.py")]
    assert "coordinator/federation" in packages  # the one a hand-written list once left out
    modules = [m for top in SHIPPED for m in _source_files(f"{top}/**/*.py")]
    assert {f"{p}/__init__.py" for p in packages} <= set(modules)
    assert sorted(set(modules) - wheel.names) == []


def test_the_lua_scripts_and_the_dashboards_files_are_in_the_wheel(wheel: Wheel) -> None:
    lua, static = _source_files("coordinator/lua/*.lua"), _source_files("ops/static/**/*")
    assert lua and static
    assert sorted(set(lua + static) - wheel.names) == []
    assert {"coordinator/py.typed", "mixin/py.typed"} <= wheel.names


def test_nothing_but_the_projects_packages_sits_at_the_top_level(wheel: Wheel) -> None:
    tops = {n.split("/", 1)[0] for n in wheel.names}
    assert {t for t in tops if not t.endswith(".dist-info")} == set(SHIPPED)
    assert set(wheel.text(".dist-info/top_level.txt").split()) == set(SHIPPED)


def test_the_wheel_declares_an_spdx_license_and_the_sidecar_command(wheel: Wheel) -> None:
    assert "License-Expression: MIT" in wheel.text(".dist-info/METADATA").splitlines()
    assert "sidecar = ops.cli:main" in wheel.text(".dist-info/entry_points.txt")


def test_the_demo_sidecar_up_runs_comes_from_the_installed_wheel(wheel: Wheel, tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           "--target", str(target), str(wheel.path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # the unpacked wheel ahead of the editable checkout, run from a folder that is no checkout
    env = {**os.environ, "PYTHONPATH": str(target)}
    found = subprocess.run([sys.executable, "-c", "import ops.demo; print(ops.demo.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).is_relative_to(target)
    usage = subprocess.run([sys.executable, "-m", "ops.demo", "--help"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "conductor" in usage.stdout, usage.stderr
    examples = subprocess.run([sys.executable, "-c", "import examples"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=60)
    assert examples.returncode != 0  # no package of that name came with the install
