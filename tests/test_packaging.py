"""The project's own files install what the server imports.

CI installs the test extra into an environment that already has most packages,
so a runtime import missing from `[project].dependencies` stays hidden there and
breaks `pip install -e . && serve run configs/demo.yaml` on a fresh machine (it
did, for httpx). Every third-party module imported anywhere in the runtime
packages must come from a declared dependency.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("deployments", "engine", "models", "ops", "configs")
FIRST_PARTY = {"deployments", "engine", "models", "ops", "configs", "bench", "tests"}
# Present only as a side effect of the torch wheels; ops/build.py imports it under try/except.
OPTIONAL = {"nvidia"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normalize(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0]) for req in project["dependencies"]}


def imported_modules(package: str) -> dict[str, str]:
    """Top-level module -> the first file importing it (absolute imports, nested ones too)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_runtime_imports_are_declared_dependencies():
    declared = declared_distributions()
    dists = packages_distributions()
    missing = []
    for package in RUNTIME_PACKAGES:
        for module, where in imported_modules(package).items():
            if module in FIRST_PARTY or module in OPTIONAL or module in sys.stdlib_module_names:
                continue
            providers = {_normalize(d) for d in dists.get(module, [])}
            if not providers & declared:
                missing.append(f"{module} ({where}; provided by {sorted(providers) or 'nothing installed'})")
    assert not missing, "imported but not in [project].dependencies: " + ", ".join(missing)


def test_the_scan_sees_the_server_imports():
    seen = imported_modules("deployments")
    assert {"httpx", "fastapi", "ray", "torch"} <= set(seen)
