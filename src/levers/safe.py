"""Text from outside, made safe to show on a terminal, in a table or in a log line.

Document names, file names, handlers' errors and whatever a job in Redis holds come from users,
documents and other processes. Shown raw, a newline forges a log line, an escape sequence
recolours or retitles the terminal, and a bidi override shows a name other than the one stored.
``shown`` escapes them all; JSON output needs nothing more (json.dumps escapes them itself).
Imports nothing of levers.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import unicodedata
from datetime import UTC, datetime

# Categories escaped: control characters (C0, DEL, C1), format characters (bidi overrides and
# isolates, zero-width characters, invisible tags), lone surrogates (a file name that is not
# UTF-8), and the line and paragraph separators that some viewers break lines at.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown(text: object, keep_newlines: bool = False) -> str:
    """``text`` with every character that could act on a terminal or a log written as an escape
    (``\\n``, ``\\x1b``, ``\\u202e``); ``keep_newlines`` keeps the line breaks of a multi-line text."""
    text = str(text)
    if text.isprintable():  # the usual case, checked in C
        return text
    if keep_newlines:
        return "\n".join(shown(line) for line in text.split("\n"))
    return "".join(_escaped(char) for char in text)


def _escaped(char: str) -> str:
    if unicodedata.category(char) not in _ESCAPED_CATEGORIES:
        return char
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


# The escapes ``shown`` writes, as a user types them back (levers show 'new\nline.md').
_ESCAPE = re.compile(r"\\(?:([nrt])|x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))")


def unshown(text: str) -> str:
    """``text`` with the escapes ``shown`` writes turned back into the characters they stand for."""

    def character(match: re.Match[str]) -> str:
        short, *code = match.groups()
        if short:
            return {"n": "\n", "r": "\r", "t": "\t"}[short]
        point = int(next(c for c in code if c), 16)
        return chr(point) if point <= sys.maxunicode else match.group()

    return _ESCAPE.sub(character, text)


class OneLineFormatter(logging.Formatter):
    """Log records whose message is always one line, whatever text it carries (a document's name,
    a handler's error): control characters are escaped, so no text can start a line that reads as
    a record of its own. A traceback keeps its lines, each indented under its record."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = shown(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: object) -> str:
        return _indented(super().formatException(ei))  # type: ignore[arg-type]

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + shown(line) for line in text.split("\n"))


def escape_logs(*loggers: logging.Logger) -> None:
    """Give every handler of ``loggers`` a ``OneLineFormatter`` in place of its formatter, with the
    same format, style and date format (handlers set up by others too, such as `rq worker`'s)."""
    for logger in loggers:
        for handler in logger.handlers:
            old = handler.formatter or logging.Formatter()
            if not isinstance(old, (OneLineFormatter, JsonFormatter)):
                formatter = OneLineFormatter()
                formatter.__dict__.update(old.__dict__)
                handler.setFormatter(formatter)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for platforms that parse logs: time, level, logger, pid, the
    message, ``fields`` (the phase and queue of a worker, say) and the error's traceback, if any."""

    def __init__(self, fields: dict[str, str] | None = None) -> None:
        super().__init__()
        self.fields = fields or {}

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            **self.fields,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line)


def log_to(
    handler: logging.Handler, text_format: str, json_fields: dict[str, str] | None, verbose: bool
) -> None:
    """Send every log record to ``handler``, as text lines in ``text_format`` or, with
    ``json_fields``, as JSON lines. RQ's own lines (one or more per job) and other libraries'
    information only when ``verbose``."""
    handler.setFormatter(
        JsonFormatter(json_fields) if json_fields is not None else OneLineFormatter(text_format)
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    # levers' own events, its phases' ctx.log included; the libraries' chatter only when asked
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("levers").setLevel(logging.INFO)
    for name in ("rq.worker", "rq.scheduler", "rq.queue", "rq.job"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    sys.unraisablehook = _UnraisableToLog(verbose)


class _UnraisableToLog:
    """An exception Python cannot raise (one in a ``__del__``: a library's connection collected
    after its event loop closed, say) is printed by Python as a traceback on stderr, past the
    log's format and its one line per event. It goes to the log instead: one line, and its
    traceback only when ``verbose``."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.log = logging.getLogger("levers.unraisable")

    def __call__(self, unraisable: sys.UnraisableHookArgs) -> None:
        try:
            where = f" {unraisable.object!r}" if unraisable.object is not None else ""
        except Exception:  # its repr may be what fails, as when its event loop is gone
            where = f" a {type(unraisable.object).__qualname__}"
        error = unraisable.exc_value if unraisable.exc_value is not None else unraisable.exc_type
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        what = f"{unraisable.exc_type.__name__}: {first}" if first else unraisable.exc_type.__name__
        self.log.warning(
            "%s%s: %s", unraisable.err_msg or "Exception ignored in", where, what,
            exc_info=unraisable.exc_value if self.verbose else None,
        )  # fmt: skip
