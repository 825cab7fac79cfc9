"""Dotted setting names, as `levers get` and `levers set` take them, and the values they name.

``chunking.semaphore`` is short for ``phases.chunking.levers.semaphore``, ``chunking.timeout`` for
``phases.chunking.timeout``; a name that starts with a top-level key is taken as it is. Imports
neither the model nor a parser: `levers get` reads the settings a validated record keeps, and
takes the names from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any

from levers.errors import UsageError


@dataclass(frozen=True)
class SettingNames:
    """The keys a dotted name may use: top-level, a phase's, a phase's levers', and the phases."""

    top: tuple[str, ...]
    phase: tuple[str, ...]
    lever: tuple[str, ...]
    phases: tuple[str, ...]

    @classmethod
    def of(cls, settings: dict[str, Any]) -> SettingNames:
        """The names of a pipeline's settings with every default spelt out (each phase has every key)."""
        phases: dict[str, Any] = settings["phases"]
        first = next(iter(phases.values()))
        return cls(tuple(settings), tuple(first), tuple(first["levers"]), tuple(phases))


def resolve_path(dotted: str, names: SettingNames) -> tuple[str, ...]:
    """The full key path for a dotted name."""
    parts = tuple(p for p in dotted.strip().split(".") if p)
    if not parts:
        raise UsageError(f"empty key {dotted!r}", fix="write it as PHASE.LEVER, e.g. chunking.semaphore")
    if parts[0] in names.top:
        if parts[0] == "phases" and len(parts) > 1 and parts[1] not in names.phases:
            hint = did_you_mean(parts[1], list(names.phases))
            raise UsageError(f"no phase named {parts[1]!r}{hint}", fix="see `levers validate`")
        return parts
    if parts[0] in names.phases and len(parts) == 1:  # the phase's settings, all of them
        return ("phases", parts[0])
    if parts[0] in names.phases and len(parts) == 2 and parts[1] in names.lever:
        return ("phases", parts[0], "levers", parts[1])
    if parts[0] in names.phases and len(parts) >= 2 and parts[1] in names.phase:
        return ("phases", *parts)
    if parts[0] not in names.phases:
        hint = did_you_mean(parts[0], [*names.phases, *names.top])
        raise UsageError(f"no phase or key named {parts[0]!r}{hint}", fix="see `levers validate`")
    hint = did_you_mean(parts[-1], [*names.lever, *names.phase])
    raise UsageError(f"{parts[0]} has no setting {'.'.join(parts[1:])!r}{hint}")


def value_at(settings: dict[str, Any], dotted: str, source: str) -> Any:
    """The value at a dotted name in ``settings`` (defaults included); ``source`` names the file."""
    node: Any = settings
    for part in resolve_path(dotted, SettingNames.of(settings)):
        if not isinstance(node, dict) or part not in node:
            raise UsageError(f"{dotted}: not set in {source}")
        node = node[part]
    return node


def setting_text(value: Any) -> str:
    """A setting's value as `levers get` prints it and `levers set` reports it: text as it is,
    anything else as JSON (true, null, [".pdf", ".txt"]), as the file would have it."""
    return value if isinstance(value, str) else json.dumps(value)


def did_you_mean(word: str, choices: list[str]) -> str:
    """'; did you mean X?' for the closest choice, or '' when none is close."""
    match = get_close_matches(word, choices, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""
