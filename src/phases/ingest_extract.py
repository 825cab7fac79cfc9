"""Extraction for documents that arrive in memory (``doc.content`` is bytes).

The bytes are parsed where they are, never written to disk; the output is extraction's. Option
``max_bytes`` (default 50 MB) is checked before anything is parsed, since such documents come
from outside and nothing upstream bounded their size. ``max_pages`` applies as in extraction.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from levers import Document, PhaseContext
from phases import extraction
from phases.extraction import check_size, extract_bytes

DEFAULT_MAX_BYTES = 50_000_000


class Options(extraction.Options):
    """ingest_extract's options in pipeline.yaml: extraction's, with a bound on size by default."""

    max_bytes: Annotated[
        int | None,
        Field(ge=1, le=extraction.MAX_BYTES, description="Documents larger than this fail unread."),
    ] = DEFAULT_MAX_BYTES


async def ingest(doc: Document, ctx: PhaseContext[Options]) -> dict[str, Any]:
    """Handler: extract an in-memory document on the phase's thread pool."""
    check_size(doc.size, ctx.options.max_bytes)
    data = doc.read_bytes()
    return await ctx.run_in_thread(extract_bytes, data, doc.name, ctx.options.max_pages)
