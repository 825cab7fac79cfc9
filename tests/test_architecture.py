"""The tree is the architecture: groups depend on each other without a cycle, leaves on nothing,
a read-only command loads neither the worker nor the supervisor, and phase code uses levers
through its public API alone."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

LEVERS = Path(__file__).resolve().parent.parent / "src" / "levers"
PHASES = LEVERS.parent / "phases"
# Modules at the top of the tree that every group may use; they use only each other.
LEAVES = {"errors", "keys", "metrics", "files", "safe"}


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module of ``package`` a file imports, at its top, inside a function or for type
    checking only; ``from package import name`` counts as ``package.name``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            found |= {f"{package}.{a.name}" for a in node.names} if node.module == package else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package}
    return found


def imported_levers_modules(path: Path) -> set[str]:
    return imported_modules(path, "levers")


def group_of(module: str) -> str | None:
    """``levers.worker.jobs`` -> ``worker``; the package itself and its entry point have none."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] not in {"__init__", "__main__"} else None


def group_imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in LEVERS.rglob("*.py"):
        source = group_of(".".join(("levers", *path.relative_to(LEVERS).with_suffix("").parts)))
        if source is None:
            continue
        for target in filter(None, map(group_of, imported_levers_modules(path))):
            if target != source:
                edges[source].add(target)
    return edges


def test_every_module_belongs_to_a_group_or_is_a_leaf() -> None:
    flat = {p.stem for p in LEVERS.glob("*.py")} - {"__init__", "__main__"}
    assert flat == LEAVES, f"new top-level modules go into a group: {sorted(flat - LEAVES)}"


def test_leaves_import_only_leaves() -> None:
    edges = group_imports()
    assert {leaf: sorted(edges[leaf] - LEAVES) for leaf in LEAVES if edges[leaf] - LEAVES} == {}


def test_groups_import_each_other_without_a_cycle() -> None:
    try:
        order = list(graphlib.TopologicalSorter(group_imports()).static_order())
    except graphlib.CycleError as cycle:
        raise AssertionError(
            f"the groups import each other in a cycle: {' -> '.join(cycle.args[1])}"
        ) from None
    assert {"pipeline", "server", "documents", "worker", "supervisor", "observing", "cli"} <= set(order)


def test_the_read_side_loads_neither_worker_nor_supervisor() -> None:
    """`levers status` and the exporter read supervisors' reports, not the code that writes them."""
    probe = (
        "import sys, levers.cli.app, levers.observing.exporter\n"
        "print(' '.join(m for m in sys.modules if m.startswith(('levers.worker', 'levers.supervisor'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.split() == []


def test_phases_use_only_the_public_api() -> None:
    """Phase code imports ``from levers import ...``: a name it needs is exported there, never
    reached for in levers' groups."""
    reached = {path.name: sorted(levers_modules_beyond_the_package(path)) for path in PHASES.glob("*.py")}
    assert {name: modules for name, modules in reached.items() if modules} == {}


def levers_modules_beyond_the_package(path: Path) -> set[str]:
    """The modules of levers a file imports other than the package ``levers`` itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("levers."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("levers.")}
    return found


def test_public_names_resolve() -> None:
    """Every name ``levers`` exports loads, so a phase's ``from levers import X`` cannot break."""
    probe = "import levers\nfor name in levers.__all__: getattr(levers, name)"
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_phase_modules_import_each_other_without_a_cycle() -> None:
    edges = {
        f"phases.{path.stem}": {m for m in imported_modules(path, "phases") if m != "phases.__init__"}
        for path in PHASES.glob("*.py")
    }
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as cycle:
        raise AssertionError(
            f"phase modules import each other in a cycle: {' -> '.join(cycle.args[1])}"
        ) from None
