"""A phase of your own: the most frequent words of each document, after levers' extraction.

Any importable module works as a handler; this one sits beside its pipeline.yaml, which levers
puts on the import path.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from levers import Document, PhaseContext

# Words too common to say what a document is about.
COMMON_WORDS = """
a an and are as at be by for from has have in is it its of on or that the this to was were which with
"""
STOPWORDS = frozenset(COMMON_WORDS.split())


def keywords(doc: Document, ctx: PhaseContext) -> dict[str, Any]:
    words = re.findall(r"[a-z][a-z'-]{2,}", doc.input["text"].lower())
    counts = Counter(w for w in words if w not in STOPWORDS)
    top = int(ctx.options.get("top", 10))
    return {"title": doc.input["title"], "keywords": [w for w, _ in counts.most_common(top)]}
