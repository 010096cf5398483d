"""The dependency direction of the design card, and lazy heavy imports in the CLIs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level project packages it must never import
FORBIDDEN = {
    "models": {"client", "server", "privacy"},
    "privacy": {"client", "server"},
    "client": {"server"},
    "server": {"client"},
}
# The `neurofed` CLI is the composition root of researcher commands (synthesis, local training).
COMPOSITION_ROOTS = {ROOT / "server" / "cli.py"}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_dependency_direction(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path in COMPOSITION_ROOTS:
            continue
        bad = _imported_top_levels(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "dependency direction violated:\n" + "\n".join(offenders)


def test_nothing_outside_server_imports_server() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("models", "privacy", "client")
        for path in (ROOT / package).rglob("*.py")
        if "server" in _imported_top_levels(path)
    ]
    assert offenders == []


@pytest.mark.parametrize("module", ["server.cli", "client.cli"])
def test_cli_help_does_not_import_heavy_libraries(module: str) -> None:
    code = (
        f"import sys, {module} as cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'opacus', 'flwr') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
