"""Help text as click shows it: a value's METAVAR, nothing for a flag, NAME... for arguments.

Typer (0.29) shows each parameter's Python type instead (`<bool>`, `<list[str]>`, `{paths}`),
which tells a user of the command line nothing. Its help has no setting for this, so the two
methods that render it are replaced here, once, before any help is printed.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperOption

# Typer's type labels, as click names them
_NAMES = {
    "str": "TEXT",
    "int": "INTEGER",
    "float": "FLOAT",
    "path": "PATH",
    "file": "FILE",
    "directory": "DIR",
}


def _metavar(param: Any, ctx: Any) -> str | None:
    if param.metavar is not None:
        return str(param.metavar)
    if getattr(param, "is_flag", False):
        return None
    label = str(param.display_type(ctx)).strip("<>")
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    name = _NAMES.get(label, label if "|" in label else label.upper())  # choices as typed
    return f"{name}..." if param.nargs != 1 else name


def _usage_name(param: Any) -> str:
    name = str(param.metavar or param.name.upper())
    name += "..." if param.nargs != 1 else ""
    return name if param.required else f"[{name}]"


def plain_metavars() -> None:
    TyperOption.display_type_rich = _metavar  # type: ignore[method-assign,assignment]
    TyperArgument.display_type_rich = _metavar  # type: ignore[method-assign,assignment]
    TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign,assignment]
