"""A phase of your own: the most frequent words of each document, after levers' extraction.

Any importable module works as a handler; this one sits beside its pipeline.yaml, which levers
puts on the import path. ``Options`` declares the phase's ``options:``, which `levers validate`
checks with the rest of the file.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from pydantic import Field

from levers import Document, PhaseContext, PhaseOptions

# Words too common to say what a document is about.
COMMON_WORDS = """
a an and are as at be by for from has have in is it its of on or that the this to was were which with
"""
STOPWORDS = frozenset(COMMON_WORDS.split())


class Options(PhaseOptions):
    top: int = Field(default=10, ge=1, le=1000, description="Keywords kept per document.")


def keywords(doc: Document, ctx: PhaseContext[Options]) -> dict[str, Any]:
    words = re.findall(r"[a-z][a-z'-]{2,}", doc.input["text"].lower())
    counts = Counter(w for w in words if w not in STOPWORDS)
    return {"title": doc.input["title"], "keywords": [w for w, _ in counts.most_common(ctx.options.top)]}
