"""Import hygiene: nothing happens at import time, no module reaches into another's private names, no cycles.

* importing ``worker`` or any producer module builds no Celery app and reads no environment: a broken
  ``SLIP_*`` value only matters to the command that needs it;
* ``import producer.cli`` (what ``slip --help`` loads) imports no torch;
* no module of slip/, worker/, producer/ or bench/ imports a private (``_name``) name of another module;
* the module-level imports of the project form no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("slip", "jobs", "worker", "producer")
BROKEN_ENV = {"SLIP_DEVICE": "gpu", "SLIP_VISIBILITY_TIMEOUT": "10", "SLIP_BROKER_URL": "http://nope"}


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _modules(roots=PACKAGES + ("bench",)) -> dict[str, Path]:
    found = {}
    for root in roots:
        for path in (REPO / root).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    package = module if (REPO / Path(*module.split(".")) / "__init__.py").is_file() else module.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def test_importing_the_cli_and_the_worker_builds_nothing_and_imports_no_torch():
    light = _python("import sys, producer.cli; producer.cli.build_app(); print('torch' in sys.modules)", BROKEN_ENV)
    assert light.returncode == 0, light.stderr
    assert light.stdout.strip() == "False"
    modules = ", ".join(sorted(m for m in _modules(PACKAGES) if m != "worker.celery"))
    everything = _python(f"import {modules}", BROKEN_ENV)
    assert everything.returncode == 0, everything.stderr  # a broken SLIP_* env breaks no import


def test_the_celery_entry_point_reads_the_environment_once_and_says_what_is_wrong():
    proc = _python("import worker.celery", BROKEN_ENV)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "SLIP_DEVICE='gpu'" in last, proc.stderr


def test_help_works_with_a_broken_environment():
    proc = subprocess.run([sys.executable, "-m", "producer", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, **BROKEN_ENV})
    assert proc.returncode == 0, proc.stderr
    assert "submit" in proc.stdout and "segment" in proc.stdout and "Traceback" not in proc.stderr


def test_a_bad_setting_is_one_line_from_the_command_that_needs_it(tmp_path):
    import os

    env = {**os.environ, "SLIP_VISIBILITY_TIMEOUT": "10", "SLIP_STORE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "producer", "status", "20260101-000000-abcdef"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: SLIP_VISIBILITY_TIMEOUT (10 s) must exceed SLIP_TASK_TIME_LIMIT (1800 s), or running tasks get "
        "delivered twice"]


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(module, node)
                if source.split(".")[0] not in PACKAGES + ("bench",) or source == module:
                    continue
                offenders += [f"{module}: from {source} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_imports_form_no_cycle():
    """No cycle, counting the imports inside functions too: a lazy import hides a cycle, it does not remove it."""
    modules = _modules(PACKAGES)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[module] |= {t for t in targets if t in modules and t != module}
    cycles = _cycles(graph)
    assert cycles == [], cycles


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_init_modules_only_document_or_reexport(package):
    """A package's __init__ holds a docstring and at most lazy re-exports: no code runs on import."""
    tree = ast.parse((REPO / package / "__init__.py").read_text())
    allowed = (ast.Expr, ast.ImportFrom, ast.Import, ast.Assign, ast.FunctionDef, ast.AnnAssign)
    assert all(isinstance(node, allowed) for node in tree.body)
    calls = [n for n in tree.body if isinstance(n, ast.Expr) and not isinstance(n.value, ast.Constant)]
    assert calls == []
