"""The house's rules, as a permanent test: one direction of dependency, one job a file, lazy CLIs.

Floors, lowest first: common/ (standard library only, and rich for terminal progress); models/ and privacy/ (leaves); contract/ (what
coordinator and sites agree on); client/ (the site) and server/ (the coordinator), which never import
each other; study/ (a researcher's machine, composes everything). Arrows point down only; bench/ and
tests/ may import anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "models", "privacy", "contract", "client", "server", "study")

# package -> the project packages it may import (besides itself)
ALLOWED = {
    "common": set(),
    "models": {"common"},
    "privacy": {"common"},
    "contract": {"common", "models"},
    "client": {"common", "models", "privacy", "contract"},
    "server": {"common", "models", "privacy", "contract"},
    "study": {"common", "models", "privacy", "contract", "client", "server"},
}
MAX_LINES = 450
"""A file longer than this likely holds more than one job."""


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_lower_floors(package: str) -> None:
    forbidden = set(PACKAGES) - ALLOWED[package] - {package}
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_top_levels(path) & forbidden
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "dependency direction violated:\n" + "\n".join(offenders)


COMMON_THIRD_PARTY = {"rich"}
"""What common/ may import besides the standard library: rich draws the one progress bar (common/progress.py)."""


def test_common_uses_the_standard_library_only() -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__"} | COMMON_THIRD_PARTY
    offenders = [
        f"{path.relative_to(ROOT)} imports {sorted(names)}"
        for path in sorted((ROOT / "common").rglob("*.py"))
        if (names := _imported_top_levels(path) - allowed)
    ]
    assert offenders == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_file_holds_more_than_one_job(package: str) -> None:
    long_files = [
        f"{path.relative_to(ROOT)} ({n} lines)"
        for path in sorted((ROOT / package).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert long_files == [], f"files over {MAX_LINES} lines: split them by job"


def test_every_package_is_installed_and_in_the_image() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    included = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert on_disk == set(PACKAGES) and included == set(PACKAGES)
    docker = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    ignore = (ROOT / "deploy" / "docker" / "Dockerfile.dockerignore").read_text().split()
    for package in PACKAGES:
        assert f"COPY {package} ./{package}" in docker, f"the Dockerfile does not copy {package}/"
        assert f"!{package}/" in ignore, f"the Docker build context leaves out {package}/"


@pytest.mark.parametrize("module", ["study.cli", "server.cli", "client.cli"])
def test_cli_help_does_not_import_heavy_libraries(module: str) -> None:
    code = (
        f"import sys, {module} as cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'opacus', 'flwr') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
