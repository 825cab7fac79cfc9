"""Chunking phase: split extraction output by structure into overlapping chunks with context lines.

Splitting goes from coarse to fine: sections (between headings; a chunk never spans two),
paragraphs (blank-line separated), sentences, lines, and as a last resort fixed windows of
tokens. Chunks are packed greedily from sentence-sized units up to ``chunk_tokens`` (default
400), preferring to end at a paragraph end once at least half full; the next chunk in the same
section repeats trailing whole units worth at most ``overlap_tokens`` (default 50).

Tokens are approximated, with no tokenizer model, as the pieces the regex ``\\w+|[^\\w\\s]``
finds: every run of word characters and every punctuation mark counts one. This matches
subword tokenizers on common words and punctuation, and under-counts long or rare words and
numbers, which they split further; leave headroom under a model's hard limit.

Options (``Options``): ``chunk_tokens``, ``overlap_tokens``, ``context_provider``, and those of
model-written contexts (``phases.contexts.AnthropicOptions``). Each chunk gets a short context
from a provider, option ``context_provider``:

- ``anthropic``: a Claude model situates the chunk in the whole document (Anthropic's contextual
  retrieval; see phases.contexts for its options, shared limit, prompt caching and disk cache).
- ``local``: the offline fallback, deterministic and free: a line built from the title, the
  chunk's page, heading path and position. Nothing leaves the machine.
- ``auto`` (the default): ``anthropic`` when ANTHROPIC_API_KEY is set, else ``local``.

A provider is any object with ``name`` and ``async contexts(...) -> Contexts`` registered in
``PROVIDERS`` (and named in ``Options.context_provider``); one that asks a model uses ``ctx.map``
to stay under the semaphore lever.

Output: ``{"provider", "model", "title", "usage", "cached", "chunks": [{"index", "text", "context",
"start", "end", "page", "tokens", "headings", "start_s", "end_s"}]}`` where ``start``/``end`` are
offsets in the extracted text, ``page`` is 1-based and ``headings`` is the heading path from the
outermost heading in. ``start_s``/``end_s`` are the chunk's span in seconds of a recording: from
the first word's start to the last word's end, for input with word timings (``words``, each
with ``offset`` in the text, ``start_s`` and ``end_s``, as the transcription phase gives them);
null otherwise. ``usage`` sums the tokens of the document's API calls (``input_tokens``,
``output_tokens``, ``cache_creation_input_tokens``, ``cache_read_input_tokens``, ``calls``; all
zero for ``local``), ``cached`` counts contexts taken from the disk cache and ``model`` is None
for ``local``.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from levers import Document, Permanent, PhaseContext
from phases.chunk_types import Chunk, ContextProvider, Contexts
from phases.contexts import API_KEY_ENV, AnthropicContext, AnthropicOptions, require_api_key

DEFAULT_CHUNK_TOKENS = 400
DEFAULT_OVERLAP_TOKENS = 50
MIN_CHUNK_TOKENS = 16
# Far above any embedding model's input; a chunk this long is a whole chapter.
MAX_CHUNK_TOKENS = 100_000

TOKEN = re.compile(r"\w+|[^\w\s]")
_PARAGRAPH_GAP = re.compile(r"\n[ \t]*\n\s*")
# Whitespace after sentence-ending punctuation, optionally followed by a closing quote/bracket.
_SENTENCE_GAP = re.compile(r"(?<=[.!?…])\s+|(?<=[.!?…][\"'”’)\]])\s+")
_LINE_GAP = re.compile(r"\s*\n\s*")


class ChunkingError(Permanent, ValueError):
    """The input cannot be chunked; the message is the one-line reason."""


class Options(AnthropicOptions):
    """chunking's options in pipeline.yaml; those of model-written contexts come with them."""

    chunk_tokens: Annotated[
        int,
        Field(
            ge=MIN_CHUNK_TOKENS, le=MAX_CHUNK_TOKENS, description="Most tokens of one chunk (approximated)."
        ),
    ] = DEFAULT_CHUNK_TOKENS
    overlap_tokens: Annotated[
        int,
        Field(
            ge=0,
            le=MAX_CHUNK_TOKENS,
            description="Tokens of whole units a chunk repeats from the one before.",
        ),
    ] = DEFAULT_OVERLAP_TOKENS
    context_provider: Annotated[
        Literal["auto", "anthropic", "local"],
        Field(description="Who writes chunk contexts: anthropic (Claude), local (offline), or auto: "
              "anthropic when ANTHROPIC_API_KEY is set."),
    ] = "auto"  # fmt: skip

    @model_validator(mode="after")
    def _overlap_under_budget(self) -> Options:
        if self.overlap_tokens >= self.chunk_tokens:
            raise PydanticCustomError(
                "overlap_tokens",
                "overlap_tokens ({overlap}) must be under chunk_tokens ({budget})",
                {"overlap": self.overlap_tokens, "budget": self.chunk_tokens},
            )
        return self


@dataclass(frozen=True)
class Section:
    start: int
    end: int
    headings: tuple[str, ...]


@dataclass(frozen=True)
class Unit:
    """The smallest span chunks are packed from: a sentence, a line or a token window."""

    start: int
    end: int
    tokens: int
    paragraph_end: bool


class Tokens:
    """Token pieces of one text, for counting and windowing any span of it by bisection."""

    def __init__(self, text: str) -> None:
        matches = list(TOKEN.finditer(text))
        self.starts = [match.start() for match in matches]
        self.ends = [match.end() for match in matches]

    def count(self, start: int, end: int) -> int:
        return bisect.bisect_left(self.starts, end) - bisect.bisect_left(self.starts, start)

    def windows(self, start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
        first, stop = bisect.bisect_left(self.starts, start), bisect.bisect_left(self.starts, end)
        for index in range(first, stop, size):
            yield self.starts[index], self.ends[min(index + size, stop) - 1]


class LocalContext:
    """Offline, deterministic context lines: title, page, heading path and position only."""

    name = "local"

    async def contexts(self, title: str, text: str, chunks: Sequence[Chunk], ctx: PhaseContext) -> Contexts:
        multi_page = any(chunk.page > 1 for chunk in chunks)
        lines = []
        for chunk in chunks:
            parts = [f"From '{title}'"]
            if multi_page:
                parts.append(f"page {chunk.page}")
            # a document's top heading usually repeats its title
            path = chunk.headings[1:] if chunk.headings[:1] == [title] else chunk.headings
            if path:
                parts.append(f"section '{' > '.join(path)}'")
            if chunk.start_s is not None and chunk.end_s is not None:
                parts.append(f"{clock(chunk.start_s)}-{clock(chunk.end_s)} into the recording")
            parts.append(f"part {chunk.index + 1} of {len(chunks)}")
            lines.append(", ".join(parts) + ".")
        return Contexts(lines)


PROVIDERS: dict[str, Callable[[], ContextProvider]] = {"anthropic": AnthropicContext, "local": LocalContext}


async def chunk(doc: Document, ctx: PhaseContext[Options]) -> dict[str, Any]:
    """Handler: chunk the extraction output in ``doc.input``."""
    extracted = doc.input
    if not isinstance(extracted, dict) or not isinstance(extracted.get("text"), str):
        raise ChunkingError("chunking needs extraction output with a 'text' field as its input")
    text: str = extracted["text"]
    if not text.strip():
        raise ChunkingError("extraction produced no text to chunk")
    provider = _provider(ctx.options.context_provider)
    title = str(extracted.get("title") or doc.name)
    chunks = await ctx.run_in_thread(
        split_chunks,
        text,
        extracted.get("headings") or [],
        extracted.get("page_offsets") or [0],
        ctx.options.chunk_tokens,
        ctx.options.overlap_tokens,
    )
    time_spans(chunks, extracted.get("words") or [])
    contexts = await provider.contexts(title, text, chunks, ctx)
    for item, context in zip(chunks, contexts.lines, strict=True):
        item.context = context
    return {
        "provider": provider.name,
        "model": contexts.model,
        "title": title,
        "usage": contexts.usage.as_dict(),
        "cached": contexts.cached,
        "chunks": [asdict(item) for item in chunks],
    }


def time_spans(chunks: Sequence[Chunk], words: Sequence[Any]) -> None:
    """Give each chunk the time span of the words it holds: from its first word's start to its
    last word's end. Words without an offset and both times are skipped."""
    timed = sorted(
        (int(w["offset"]), float(w["start_s"]), float(w["end_s"]))
        for w in words
        if isinstance(w, dict)
        and all(isinstance(w.get(k), (int, float)) for k in ("offset", "start_s", "end_s"))
    )
    offsets = [offset for offset, _, _ in timed]
    for chunk in chunks:
        first = bisect.bisect_left(offsets, chunk.start)
        last = bisect.bisect_left(offsets, chunk.end) - 1
        if first <= last:
            chunk.start_s, chunk.end_s = timed[first][1], max(end for _, _, end in timed[first : last + 1])


def clock(seconds: float) -> str:
    """A time in a recording, to the tenth of a second: 0:42.5, 12:03.0, 1:02:03.0."""
    hours, tenths = divmod(round(max(seconds, 0.0) * 10), 36_000)
    minutes, tenths = divmod(tenths, 600)
    second = f"{tenths // 10:02d}.{tenths % 10}"
    return f"{hours}:{minutes:02d}:{second}" if hours else f"{minutes}:{second}"


def reuse_provider(options: Options) -> str:
    """Who writes the contexts, for levers' reuse key: what ``auto`` picks depends on the
    environment, and another model writes other contexts."""
    name = _provider_name(options.context_provider)
    return f"anthropic:{options.model}" if name == "anthropic" else name


def _provider_name(name: str) -> str:
    if name == "auto":
        return "anthropic" if os.environ.get(API_KEY_ENV, "").strip() else "local"
    return name


def _provider(name: str) -> ContextProvider:
    """The chosen provider; checked before any splitting, so that a missing key fails at once."""
    name = _provider_name(name)
    if name == "anthropic":
        require_api_key()  # chosen explicitly without a key: a one-line ContextError
    return PROVIDERS[name]()


def split_chunks(
    text: str,
    headings: Sequence[dict[str, Any]],
    page_offsets: Sequence[int],
    budget: int = DEFAULT_CHUNK_TOKENS,
    overlap: int = DEFAULT_OVERLAP_TOKENS,
) -> list[Chunk]:
    """Chunks of ``text`` (without context lines), in order; pure and deterministic."""
    tokens = Tokens(text)
    chunks: list[Chunk] = []
    for section in sections(text, headings):
        units = section_units(text, section, tokens, budget)
        for first, stop in pack(units, budget, overlap):
            start, end = units[first].start, units[stop - 1].end
            chunks.append(
                Chunk(
                    index=len(chunks),
                    text=text[start:end],
                    start=start,
                    end=end,
                    page=max(bisect.bisect_right(page_offsets, start), 1),
                    tokens=tokens.count(start, end),
                    headings=list(section.headings),
                )
            )
    return chunks


def sections(text: str, headings: Sequence[dict[str, Any]]) -> list[Section]:
    """Spans between consecutive headings, each with its heading path.

    A heading with nothing under it but the next heading is folded into the next section, so no
    chunk holds a bare heading.
    """
    marks = sorted(
        (int(h["offset"]), int(h["level"]), str(h["text"]))
        for h in headings
        if 0 <= int(h["offset"]) < len(text)
    )
    result: list[Section] = []
    path: list[tuple[int, str]] = []
    start = 0
    current: tuple[str, ...] = ()
    for offset, level, heading in marks:
        body = text[start:offset].strip()
        if body and (not current or "\n" in body):
            result.append(Section(start, offset, current))
            start = offset
        elif not current:
            start = offset
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, heading))
        current = tuple(name for _, name in path)
    result.append(Section(start, len(text), current))
    return result


def section_units(text: str, section: Section, tokens: Tokens, budget: int) -> list[Unit]:
    """A section's units: sentences, split into lines and then token windows when over budget."""
    units: list[Unit] = []
    for p_start, p_end in _split(text, section.start, section.end, _PARAGRAPH_GAP):
        spans: list[tuple[int, int]] = []
        for s_start, s_end in _split(text, p_start, p_end, _SENTENCE_GAP):
            if tokens.count(s_start, s_end) <= budget:
                spans.append((s_start, s_end))
                continue
            for l_start, l_end in _split(text, s_start, s_end, _LINE_GAP):
                if tokens.count(l_start, l_end) <= budget:
                    spans.append((l_start, l_end))
                else:
                    spans.extend(tokens.windows(l_start, l_end, budget))
        units.extend(
            Unit(start, end, tokens.count(start, end), index == len(spans) - 1)
            for index, (start, end) in enumerate(spans)
        )
    return units


def _split(text: str, start: int, end: int, gap: re.Pattern[str]) -> Iterator[tuple[int, int]]:
    """The non-blank spans of text[start:end] between matches of ``gap``, trimmed."""
    position = start
    for match in gap.finditer(text, start, end):
        yield from _trimmed(text, position, match.start())
        position = match.end()
    yield from _trimmed(text, position, end)


def _trimmed(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    piece = text[start:end]
    stripped = piece.strip()
    if stripped:
        begin = start + len(piece) - len(piece.lstrip())
        yield begin, begin + len(stripped)


def pack(units: Sequence[Unit], budget: int, overlap: int) -> Iterator[tuple[int, int]]:
    """Index ranges [first, stop) of the units that make each chunk."""
    first = 0
    while first < len(units):
        stop = _fill(units, first, budget)
        yield first, stop
        if stop == len(units):
            return
        first = _overlap_start(units, first, stop, budget, overlap)


def _fill(units: Sequence[Unit], first: int, budget: int) -> int:
    """Where a chunk from ``first`` ends: as full as fits, pulled back to a paragraph end if one
    leaves it at least half full."""
    total, stop = units[first].tokens, first + 1
    while stop < len(units) and total + units[stop].tokens <= budget:
        total += units[stop].tokens
        stop += 1
    if stop == len(units) or units[stop - 1].paragraph_end:
        return stop
    kept = total
    for end in range(stop - 1, first, -1):
        kept -= units[end].tokens
        if kept < budget // 2:
            break
        if units[end - 1].paragraph_end:
            return end
    return stop


def _overlap_start(units: Sequence[Unit], first: int, stop: int, budget: int, overlap: int) -> int:
    """Where the next chunk starts: trailing whole units of this one worth at most ``overlap``,
    never so many that the next unit would not fit, and always past ``first``."""
    start, carried = stop, 0
    while start - 1 > first:
        carry = carried + units[start - 1].tokens
        if carry > overlap or carry + units[stop].tokens > budget:
            break
        start, carried = start - 1, carry
    return start
