"""The layout's rules, computed from the source: no import circles, and each package imports only what it may.

- ``provider/`` never imports celery or kombu; ``provider.fleet`` never imports httpx or the vLLM client;
  ``provider.protocol`` never imports httpx, ``provider.vllm``, ``provider.fleet`` or the fleet's ``Settings``
  (it reads only its own ``provider.protocol.settings.SecuritySettings``).
- ``tasks/`` never imports httpx.
- No circle among the modules of ``provider/`` and ``tasks/`` (imports run at import time: module level, not
  inside functions or under ``TYPE_CHECKING``).
- ``import tasks`` (what a producer does) loads no worker module and no httpx.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("provider", "tasks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(path: Path, *, module_level_only: bool) -> set[str]:
    """Dotted names a module imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and _is_type_checking(node):
                if not module_level_only:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, block, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])
            elif not module_level_only:
                visit([child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)])

    visit(tree.body)
    return found


def test_no_import_circle_in_provider_or_tasks() -> None:
    modules = source_modules()
    graph = {
        name: {target for target in imported_names(path, module_level_only=True) if target in modules} - {name}
        for name, path in modules.items()
    }
    # A package's __init__ importing its own modules is how re-exports work, not a circle through the package.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name + ".").startswith(t + ".")}
    circles = _strongly_connected(graph)
    assert not circles, "import circles: " + "; ".join(" -> ".join(sorted(c)) for c in circles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: every group of two or more modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in graph:
        if node not in index:
            connect(node)
    return groups


FORBIDDEN = [
    ("provider", ("celery", "kombu")),
    ("provider.fleet", ("httpx", "provider.vllm.client")),
    ("provider.protocol", ("httpx", "provider.vllm", "provider.fleet", "provider.settings", "pydantic_settings")),
    ("tasks", ("httpx",)),
]


@pytest.mark.parametrize(("package", "forbidden"), FORBIDDEN, ids=[rule[0] for rule in FORBIDDEN])
def test_each_package_imports_only_what_it_may(package: str, forbidden: tuple[str, ...]) -> None:
    offences = [
        f"{name} imports {target}"
        for name, path in source_modules().items()
        if name == package or name.startswith(package + ".")
        for target in sorted(imported_names(path, module_level_only=False))
        if any(target == bad or target.startswith(bad + ".") for bad in forbidden)
    ]
    assert not offences, "\n".join(offences)


def test_import_tasks_loads_no_worker_code_and_no_httpx() -> None:
    probe = (
        "import sys, tasks; "
        "print(' '.join(sorted(m for m in sys.modules if m == 'httpx' or m in "
        "('tasks.worker', 'tasks.pipeline', 'tasks.execution', 'tasks.management', 'tasks.consumer', "
        "'provider.vllm.client'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == []


def test_the_layout_check_sees_a_circle() -> None:
    """The circle finder itself: a two-module circle is found, a chain is not."""
    assert _strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]
    assert _strongly_connected({"a": {"b"}, "b": set()}) == []
