"""How a plan's numbers read: significant digits, times with their real precision, bars; and
the forms a plan is shown in (without the terminal library that draws them, for `--json`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum


class PlanFormat(StrEnum):
    table = "table"
    markdown = "markdown"


BAR_WIDTH = 40
_EIGHTHS = " ▏▎▍▌▋▊▉"


def opt(value: float | None, show: Callable[[float], str]) -> str:
    return "unknown" if value is None else show(value)


def sig(value: float, digits: int = 2) -> str:
    """At least ``digits`` significant digits, never an exponent: 0.033, 0.33, 120, 1200."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    magnitude = math.floor(math.log10(abs(value)))
    return f"{value:.{max(0, digits - 1 - magnitude)}f}"


def secs(value: float) -> str:
    """A time with its real precision, 3 significant digits: 0.0024, 0.49, 9, 90, 1234."""
    if value >= 100:
        return f"{value:.0f}"
    text = sig(value, 3)
    return text.rstrip("0").rstrip(".") if "." in text else text


def num(value: float) -> str:
    """A count or a time as written: 90, 9, 4.1, 2050, 0.25."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def percent(value: float) -> str:
    return f"{value:.0%}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{secs(seconds)} s"
    if seconds < 2 * 3600:
        return f"{seconds:.0f} s ({sig(seconds / 60)} min)"
    if seconds < 2 * 86400:
        return f"{seconds:.0f} s ({sig(seconds / 3600)} h)"
    return f"{seconds:.0f} s ({sig(seconds / 86400)} days)"


def bar(fraction: float) -> str:
    """A bar of unicode eighth blocks; any capacity above zero shows at least a sliver."""
    eighths = round(max(0.0, min(1.0, fraction)) * BAR_WIDTH * 8)
    if fraction > 0 and eighths == 0:
        eighths = 1
    full, rest = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[rest] if rest else "")
