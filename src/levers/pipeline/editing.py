"""Editing pipeline.yaml in place: `levers set`.

An edit keeps the file's comments, key order, quoting, blank lines and indentation (ruamel.yaml
round trip), so its diff is exactly the values that changed. It is validated with the same model
as every load before anything is written, written atomically (temporary file, then rename) and
made under an exclusive lock, so two concurrent edits lose no update. ruamel.yaml is imported by
the functions that edit.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from levers.errors import UsageError
from levers.files import make_state_dir, write_atomically
from levers.pipeline.dotted import SettingNames, resolve_path
from levers.pipeline.loading import LoadedPipeline, load_pipeline, parse_pipeline, read_tree, state_dir_of
from levers.pipeline.model import LeverSettings, Phase, Pipeline

if TYPE_CHECKING:
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

LEVER_NAMES = tuple(LeverSettings.model_fields)
PHASE_KEYS = tuple(Phase.model_fields)
TOP_KEYS = tuple(Pipeline.model_fields)


@dataclass(frozen=True)
class Change:
    path: tuple[str, ...]
    old: Any
    new: Any

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def setting_names(phases: Sequence[str]) -> SettingNames:
    """The names a dotted key may use in a pipeline of ``phases``, from the model."""
    return SettingNames(TOP_KEYS, PHASE_KEYS, LEVER_NAMES, tuple(phases))


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML (15 is a number, true a boolean, [a, b] a list)."""
    from ruamel.yaml import YAML

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"{text!r} is not KEY=VALUE", fix="e.g. levers set chunking.semaphore=15")
    try:
        value = YAML(typ="safe").load(raw) if raw.strip() else ""
    except Exception:  # ruamel raises several error types for a malformed scalar
        raise UsageError(f"{key}: cannot read {raw!r} as a value", fix="quote it if it is text") from None
    return key.strip(), value


def set_values(path: Path, assignments: Sequence[str]) -> tuple[LoadedPipeline, list[Change]]:
    """Apply ``KEY=VALUE`` assignments to the file; nothing is written unless all of them are valid."""
    with file_lock(path):
        current = load_pipeline(path)
        text = path.read_text()
        new_text, changes = edit_text(path, text, list(current.spec.phases), assignments)
        updated = parse_pipeline(new_text.encode(), path, check_imports=True)
        if new_text != text:
            # the file keeps its mode: it is the user's, not levers' own state
            write_atomically(path, new_text.encode(), mode=path.stat().st_mode & 0o777)
    return updated, [c for c in changes if c.old != c.new]


def edit_text(
    path: Path, text: str, phases: Sequence[str], assignments: Sequence[str]
) -> tuple[str, list[Change]]:
    """``text`` of the pipeline file ``path`` with ``KEY=VALUE`` assignments applied, layout kept.
    Loaded within the budgets of every load (SpecError past them), but not validated."""
    from levers.pipeline.safe_yaml import round_trip_yaml

    parsed = [parse_assignment(a) for a in assignments]
    yaml = round_trip_yaml()
    yaml.preserve_quotes = True  # before the load: the loaded strings remember their quotes
    tree = read_tree(text, path, yaml)
    _keep_layout(yaml, text)
    names = setting_names(phases)
    changes = [_assign(tree, resolve_path(key, names), value) for key, value in parsed]
    buffer = io.StringIO()
    yaml.dump(tree, buffer)
    return buffer.getvalue(), changes


def _assign(tree: CommentedMap, path: tuple[str, ...], value: Any) -> Change:
    from ruamel.yaml.comments import CommentedMap

    node: Any = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = CommentedMap()
        if not isinstance(child, dict):
            raise UsageError(f"{'.'.join(path)}: {part} is not a mapping in the file")
        node = child
    old = node.get(path[-1])
    node[path[-1]] = _styled_as(old, value)
    return Change(path, old, value)


def _styled_as(old: Any, value: Any) -> Any:
    """``value``, a list or mapping written on one line when the one it replaces was
    (`accepts: [.pdf, .txt]` stays one line)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    flow = getattr(getattr(old, "fa", None), "flow_style", lambda: False)()
    if not flow or not isinstance(value, (list, dict)):
        return value
    styled = CommentedSeq(value) if isinstance(value, list) else CommentedMap(value)
    styled.fa.set_flow_style()
    return styled


def _keep_layout(yaml: YAML, text: str) -> None:
    """Set ``yaml`` up to write ``text`` back with its own indentation. ``text`` must have loaded
    within the budgets: ruamel's guess of the indentation loads it once more."""
    from ruamel.yaml.util import load_yaml_guess_indent

    yaml.width = 4096  # never re-wrap a long line the user wrote
    mapping = _mapping_indent(text)
    _, sequence, offset = load_yaml_guess_indent(text)
    if offset is None:  # no block sequence in the file: any consistent choice keeps it unchanged
        sequence, offset = mapping, 0
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)


def _mapping_indent(text: str) -> int:
    """The indentation of the first nested mapping key (ruamel guesses sequences only)."""
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if stripped and stripped != line and not stripped.startswith(("#", "-")):
            return len(line) - len(stripped)
    return 2


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Held while a pipeline file is edited: edits one after another lose no update."""
    # in the state directory, which its .gitignore keeps out of version control
    lock_path = make_state_dir(state_dir_of(path)) / f"{path.name}.lock"
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
