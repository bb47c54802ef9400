"""The runtime packages import only what a plain ``pip install switchboard`` brings.

``switchboard gateway``, ``relay``, ``worker``, ``payment-worker``, ``payment-notifier`` and
``webhooks`` run from the core dependencies of pyproject.toml (the ``embedded`` extra is for
``switchboard dev`` / ``demo`` only): every third-party module that ``payments/``, ``gateway/``,
``channels/`` and ``tenants/`` import must come from a distribution listed in
``[project].dependencies``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from switchboard.protogen import REPO_ROOT

RUNTIME_PACKAGES = ("payments", "gateway", "channels", "tenants")
FIRST_PARTY = frozenset({*RUNTIME_PACKAGES, "switchboard", "__future__"})


def _normalized(name: str) -> str:
    """A distribution name in PEP 503 normal form (``Email_Validator`` -> ``email-validator``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def core_distributions() -> set[str]:
    """The distributions named in ``[project].dependencies`` (normalized, version and markers dropped)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {_normalized(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the runtime files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for package in RUNTIME_PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in FIRST_PARTY and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO_ROOT)))
    return found


def test_runtime_packages_import_only_core_dependencies() -> None:
    core = core_distributions()
    providers = importlib.metadata.packages_distributions()
    imports = third_party_imports()
    assert "aiohttp" in imports  # payments/webhooks.py: the scan sees the webhook server
    missing = {
        module: sorted(files)
        for module, files in imports.items()
        if not {_normalized(d) for d in providers.get(module, [])} & core
    }
    assert not missing, f"imported at runtime but not a core dependency: {missing}"
