"""The layers of ``jobs/`` are a contract, and the entry points start light.

- ``lint-imports`` (import-linter, configured in ``pyproject.toml``) keeps every contract on the
  tree as it is, and *breaks* when a lower layer imports a higher one: each case below copies the
  packages, adds one upward import, and expects the contract that forbids it to fail;
- importing the CLI or the Lambda handler does not import pandas (nor the other heavy
  libraries a command only sometimes needs), checked in a fresh interpreter.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))

pytestmark = pytest.mark.skipif(not Path(LINT_IMPORTS).exists(),
                                reason="import-linter is not installed (pip install -e '.[test]')")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree, env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tree)},
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the three packages and the contract, to break on purpose."""
    root = tmp_path_factory.mktemp("layers")
    for package in ("jobs", "billing", "metering"):
        shutil.copytree(ROOT / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_tree_keeps_every_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


CONTRACTS = {c["id"]: c["name"] for c in tomllib.loads(
    (ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]}

# (module that gains the import, the upward import, the id of the contract that must break)
UPWARD = [
    ("jobs/runtime/context.py", "import jobs.cli", "layers"),
    ("jobs/runtime/locks.py", "from jobs.monitoring import store", "layers"),
    ("jobs/monitoring/exports.py", "from jobs import snapshot_usage", "layers"),
    ("jobs/snapshot_usage.py", "from jobs import registry", "layers"),
    ("jobs/registry.py", "from jobs.triggers import runner", "layers"),
    ("jobs/synthetic/demo.py", "from jobs.cli import console", "layers"),
    ("jobs/synthetic/fleet.py", "from jobs.triggers import runner", "layers"),
    ("jobs/snapshot_usage.py", "from jobs import prune_usage", "layers"),
    ("billing/rules.py", "import jobs.runtime.errors", "layers"),
    ("metering/timeutil.py", "import billing.errors", "metering-imports-nothing-of-ours"),
]


@pytest.mark.parametrize(("module", "statement", "contract"), UPWARD,
                         ids=[f"{m}: {s}" for m, s, _ in UPWARD])
def test_an_upward_import_breaks_the_contract(
    tree: Path, module: str, statement: str, contract: str
) -> None:
    path = tree / module
    original = path.read_text(encoding="utf-8")
    # inside a function, as a lazy import would be: the contract sees those too
    path.write_text(original + f"\n\ndef _upward() -> None:\n    {statement}  # noqa\n",
                    encoding="utf-8")
    try:
        result = _lint(tree)
    finally:
        path.write_text(original, encoding="utf-8")
    assert result.returncode != 0, result.stdout
    text = " ".join(result.stdout.split())  # the report wraps long contract names
    assert f"{CONTRACTS[contract]} BROKEN" in text, result.stdout
    importer = module.removesuffix(".py").replace("/", ".")
    assert importer in result.stdout, result.stdout


HEAVY = ("pandas", "numpy", "rich", "httpx", "prometheus_client", "boto3", "apscheduler", "redis")


@pytest.mark.parametrize(("module", "allowed"), [
    ("jobs.cli", set()),
    ("jobs.triggers.aws_lambda", {"rich"}),  # structlog imports rich when it is installed
    ("jobs.registry", {"rich"}),
])
def test_importing_an_entry_point_does_not_import_pandas(module: str, allowed: set[str]) -> None:
    code = (f"import sys, json; import {module}; "
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True, cwd=ROOT)
    imported = set(json.loads(result.stdout))
    assert "pandas" not in imported
    assert imported <= allowed, f"{module} imports {sorted(imported - allowed)}"


def test_every_registered_job_body_resolves_to_its_job_module() -> None:
    """The registry names job bodies by import path; a typo would only show when the job runs."""
    from jobs import registry

    for spec in registry.JOBS.values():
        assert isinstance(spec.body, str), spec.name
        module, _, name = spec.body.partition(":")
        assert module.startswith("jobs.") and module.count(".") == 1, spec.body
        assert callable(spec.run) and spec.run.__name__ == name, spec.name
