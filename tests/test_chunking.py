"""The chunking handler: structure-first splits, token budget, overlap, pages and context lines."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from levers.worker.phase_context import Document, Levers, PhaseContext
from phases import transcription
from phases.audio import Recording
from phases.chunking import ChunkingError, Options, Tokens, chunk
from phases.extraction import extract_bytes
from phases.transcription import transcript_output
from tests.fake_deepgram import response as deepgram_response

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "docs"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default provider is "auto": without a key it is always the local one, never the API."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def run_chunk(extracted: Any, tmp_path: Path, executor: ThreadPoolExecutor, **options: Any) -> dict[str, Any]:
    ctx = PhaseContext("chunking", Levers(1, 5, 2), Options(**options), state_dir=tmp_path, executor=executor)
    return asyncio.run(chunk(Document("doc-1", "doc.md", b"", input=extracted), ctx))


def markdown(text: str) -> dict[str, Any]:
    return extract_bytes(text.encode(), "doc.md")


def test_token_approximation_counts_words_and_punctuation() -> None:
    text = "Hello, world! It's 42."
    assert Tokens(text).count(0, len(text)) == 9  # Hello , world ! It ' s 42 .


@pytest.mark.parametrize("name", sorted(path.name for path in EXAMPLES.iterdir()))
def test_example_chunks_cover_the_text_within_budget(
    name: str, tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    extracted = extract_bytes((EXAMPLES / name).read_bytes(), name)
    out = run_chunk(extracted, tmp_path, executor, chunk_tokens=80, overlap_tokens=15)
    text, chunks = extracted["text"], out["chunks"]
    assert out["provider"] == "local" and out["title"] == extracted["title"]
    assert [c["index"] for c in chunks] == list(range(len(chunks))) and len(chunks) > 1
    covered = [False] * len(text)
    for item in chunks:
        assert item["text"] == text[item["start"] : item["end"]]
        assert item["tokens"] <= 80
        covered[item["start"] : item["end"]] = [True] * (item["end"] - item["start"])
    assert all(covered[i] for i, char in enumerate(text) if not char.isspace())
    assert [c["start"] for c in chunks] == sorted(c["start"] for c in chunks)


def test_sections_are_boundaries_and_give_heading_paths(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    doc = (
        "# Quarterly report\n\nOpening words.\n\n## Results\n\n"
        "### Revenue\n\nRevenue grew. It grew a lot.\n\n"
        "### Costs\n\nCosts fell.\n\n## Outlook\n\nCalm seas ahead."
    )
    chunks = run_chunk(markdown(doc), tmp_path, executor)["chunks"]
    assert [(c["headings"], c["text"]) for c in chunks] == [
        (["Quarterly report"], "# Quarterly report\n\nOpening words."),
        # "## Results" has nothing of its own, so it opens the Revenue chunk
        (
            ["Quarterly report", "Results", "Revenue"],
            "## Results\n\n### Revenue\n\nRevenue grew. It grew a lot.",
        ),
        (["Quarterly report", "Results", "Costs"], "### Costs\n\nCosts fell."),
        (["Quarterly report", "Outlook"], "## Outlook\n\nCalm seas ahead."),
    ]
    assert chunks[1]["context"] == "From 'Quarterly report', section 'Results > Revenue', part 2 of 4."
    assert chunks[0]["context"] == "From 'Quarterly report', part 1 of 4."


def test_overlap_repeats_trailing_sentences(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    sentences = [f"Sentence number {n} talks about queue depth." for n in range(60)]
    chunks = run_chunk(markdown(" ".join(sentences)), tmp_path, executor, chunk_tokens=60, overlap_tokens=20)[
        "chunks"
    ]
    assert len(chunks) > 5
    for previous, current in pairwise(chunks):
        shared = previous["end"] - current["start"]
        assert shared > 0, "consecutive chunks overlap"
        assert previous["text"].endswith(current["text"][:shared])
        assert Tokens(current["text"]).count(0, shared) <= 20
        assert re.match(r"Sentence number \d+", current["text"]), "chunks start at a sentence"


def test_paragraph_ends_are_preferred_cut_points(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    first = " ".join(["Alpha beta gamma delta."] * 8)  # 40 tokens
    second = " ".join(["Epsilon zeta eta theta."] * 8)
    chunks = run_chunk(
        markdown(f"{first}\n\n{second}"), tmp_path, executor, chunk_tokens=60, overlap_tokens=0
    )["chunks"]
    assert [c["text"] for c in chunks] == [first, second]


def test_oversized_sentence_is_windowed(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    words = " ".join(f"word{n}" for n in range(250))  # one "sentence" with no punctuation
    chunks = run_chunk(markdown(words), tmp_path, executor, chunk_tokens=100, overlap_tokens=0)["chunks"]
    assert [c["tokens"] for c in chunks] == [100, 100, 50]
    assert " ".join(c["text"] for c in chunks) == words


def test_pdf_chunks_carry_their_page(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    extracted = extract_bytes((EXAMPLES / "pipeline-operations.pdf").read_bytes(), "ops.pdf")
    chunks = run_chunk(extracted, tmp_path, executor, chunk_tokens=80, overlap_tokens=0)["chunks"]
    offsets = extracted["page_offsets"]
    assert {c["page"] for c in chunks} == {1, 2, 3}
    for item in chunks:
        assert offsets[item["page"] - 1] <= item["start"]
        assert item["page"] == len(offsets) or item["start"] < offsets[item["page"]]
        assert f"page {item['page']}," in item["context"]


def test_output_is_deterministic(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    extracted = extract_bytes((EXAMPLES / "capacity-planning.md").read_bytes(), "capacity-planning.md")
    assert run_chunk(extracted, tmp_path, executor) == run_chunk(extracted, tmp_path, executor)


@pytest.mark.parametrize(
    ("extracted", "options", "reason"),
    [
        ({"text": "  \n "}, {}, "no text to chunk"),
        (None, {}, "needs extraction output"),
        ({"title": "no text key"}, {}, "needs extraction output"),
    ],
)
def test_bad_input_fails_with_reason(
    extracted: Any, options: dict[str, Any], reason: str, tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    with pytest.raises(ChunkingError, match=reason):
        run_chunk(extracted, tmp_path, executor, **options)


def test_chunks_of_a_transcript_carry_their_time_span(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    script = " ".join(f"Sentence {n} says how the Redis Queue feeds the PDF Parser." for n in range(30))
    answer = deepgram_response(b"", 120.0, script, {"paragraphs": "true", "punctuate": "true"})
    transcript = transcript_output(
        answer, "standup", transcription.Options(), Recording("wav", 0, "", 120.0, "header")
    )

    out = run_chunk(transcript, tmp_path, executor, chunk_tokens=40, overlap_tokens=8)

    chunks = out["chunks"]
    assert len(chunks) > 5
    for item in chunks:
        held = [w for w in transcript["words"] if item["start"] <= w["offset"] < item["end"]]
        assert (item["start_s"], item["end_s"]) == (held[0]["start_s"], held[-1]["end_s"])
    assert all(a["start_s"] < b["start_s"] for a, b in pairwise(chunks))
    assert chunks[0]["start_s"] == 0.1 and chunks[-1]["end_s"] <= 120.0
    assert re.search(
        r"From 'standup', 0:00\.1-0:\d\d\.\d into the recording, part 1 of", chunks[0]["context"]
    )


def test_chunks_without_word_timings_have_no_time_span(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    out = run_chunk(markdown("# Notes\n\nOne paragraph of text."), tmp_path, executor)

    assert [(c["start_s"], c["end_s"]) for c in out["chunks"]] == [(None, None)]
    assert "into the recording" not in out["chunks"][0]["context"]
