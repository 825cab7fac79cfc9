"""levers names, in one place, what it relies on in RQ beyond its documented API, and that place
is checked both against the installed RQ and against levers' own code."""

from __future__ import annotations

import ast
import importlib
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from rq.worker.base import BaseWorker

from levers.worker import rq_contract
from levers.worker.rq_contract import OVERRIDDEN, PRIVATE, TESTED_RQ, UnsupportedRQ, rq_classes_of

ROOT = Path(__file__).resolve().parent.parent
LEVERS = ROOT / "src" / "levers"
# Private names levers uses that are not RQ's: what else they belong to.
NOT_RQ = {"_replace": "urllib's SplitResult (a named tuple)"}


def test_the_installed_rq_has_everything_levers_relies_on() -> None:
    missing = rq_contract.missing()
    assert missing == [], f"rq {version('rq')} renamed or removed what levers relies on: {missing}"


def test_the_installed_rq_is_a_tested_release_and_pyproject_pins_those() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [pinned] = [r for r in pyproject["project"]["dependencies"] if Requirement(r).name == "rq"]
    assert Requirement(pinned).specifier == Requirement(TESTED_RQ).specifier
    assert Requirement(TESTED_RQ).specifier.contains(version("rq"))


def test_a_renamed_private_method_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(BaseWorker, "_finalize_success")
    assert rq_contract.missing() == ["rq.worker.base:BaseWorker._finalize_success"]


def test_a_renamed_instance_attribute_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # an attribute only instances have is found in the code that sets it: a release setting it
    # under another name no longer does
    monkeypatch.setattr(rq_contract, "PRIVATE", (*PRIVATE, "rq.worker.base:BaseWorker._state_renamed"))
    assert rq_contract.missing() == ["rq.worker.base:BaseWorker._state_renamed"]


def test_a_method_levers_overrides_that_rq_renamed_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # LeversWorker's would no longer be called: the job taken ahead would never be collected
    monkeypatch.delattr(BaseWorker, "dequeue_job_and_maintain_ttl")
    assert rq_contract.missing() == ["LeversWorker.dequeue_job_and_maintain_ttl (overrides nothing in RQ)"]


def test_levers_up_refuses_an_rq_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(BaseWorker, "_finalize_failure")
    with pytest.raises(UnsupportedRQ) as raised:
        rq_contract.check()
    assert "BaseWorker._finalize_failure" in str(raised.value)
    assert TESTED_RQ in str(raised.value)


def _modules() -> dict[str, ast.Module]:
    return {
        ".".join(("levers", *p.relative_to(LEVERS).with_suffix("").parts)): ast.parse(p.read_text())
        for p in LEVERS.rglob("*.py")
        if p.name != "__main__.py"  # importing it runs the CLI
    }


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_by_levers(trees: list[ast.Module]) -> set[str]:
    """Private names levers' code defines: functions, classes, and what it assigns to names or
    attributes."""
    names = set()
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.id if isinstance(node, ast.Name) else node.attr)
    return {n for n in names if _private(n)}


def _used_by_levers(trees: list[ast.Module]) -> set[str]:
    """Private attributes levers' code reads, and private names it imports from RQ."""
    used = set()
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rq":
            used |= {alias.name for alias in node.names if _private(alias.name)}
    return used


def test_the_list_of_private_names_is_what_levers_code_uses() -> None:
    trees = list(_modules().values())
    taken = _used_by_levers(trees) - _defined_by_levers(trees) - set(NOT_RQ)
    listed = {entry.rpartition(".")[2].rpartition(":")[2] for entry in PRIVATE}
    assert sorted(taken - listed) == [], (
        "levers uses these private names of RQ: add them to rq_contract.PRIVATE"
    )
    assert sorted(listed - taken) == [], "rq_contract.PRIVATE lists names levers no longer uses"


def test_the_list_of_overrides_is_what_levers_classes_override() -> None:
    found = {}
    for module in _modules():
        for name, cls in vars(importlib.import_module(module)).items():
            if not isinstance(cls, type) or cls.__module__ != module or not rq_classes_of(cls):
                continue
            bases = rq_classes_of(cls)
            overrides = sorted(
                n for n in vars(cls) if not n.startswith("__") and any(n in vars(b) for b in bases)
            )
            if overrides:
                found[f"{module}:{name}"] = tuple(overrides)
    assert found == {k: tuple(sorted(v)) for k, v in OVERRIDDEN.items()}
