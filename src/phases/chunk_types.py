"""What chunking makes and what a context provider gives back: plain data, shared by the chunking
phase (``phases.chunking``) and the providers that write chunk contexts (``phases.contexts``), and
importing neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from levers import PhaseContext

TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


@dataclass
class Chunk:
    """One chunk: its text, where it sits in the extracted text (``start``/``end`` offsets, 1-based
    ``page``, heading path), its context line, and its span in a recording (seconds, or None)."""

    index: int
    text: str
    start: int
    end: int
    page: int
    tokens: int
    headings: list[str]
    context: str = ""
    start_s: float | None = None
    end_s: float | None = None


@dataclass
class Usage:
    """Tokens of the calls made for one document, summed; ``calls`` counts answered requests
    (rate-limited attempts that were retried carry no usage and are not counted)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    calls: int = 0

    def add(self, usage: Any) -> None:
        """Add one response's ``usage``; the SDK gives None for cache fields it did not report."""
        for name in TOKEN_FIELDS:
            setattr(self, name, getattr(self, name) + (getattr(usage, name, None) or 0))
        self.calls += 1

    def as_dict(self) -> dict[str, int]:
        return {item.name: getattr(self, item.name) for item in fields(self)}


@dataclass
class Contexts:
    """What a provider gives for one document: one line per chunk, in order, and what it cost."""

    lines: list[str]
    model: str | None = None
    usage: Usage = field(default_factory=Usage)
    cached: int = 0


class ContextProvider(Protocol):
    """Writes one context line per chunk of a document; ``name`` is its ``context_provider``."""

    name: str

    async def contexts(
        self, title: str, text: str, chunks: Sequence[Chunk], ctx: PhaseContext
    ) -> Contexts: ...
