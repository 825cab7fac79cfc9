"""The extraction and ingest_extract handlers on the examples and on documents made here."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docx
import pytest
from fpdf import FPDF

from levers import Permanent
from levers.pipeline.options import options_model
from levers.worker.phase_context import Document, Levers, PhaseContext
from phases.extraction import NO_TEXT_LAYER, ExtractionError, extract
from phases.ingest_extract import DEFAULT_MAX_BYTES, ingest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "docs"


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def run(handler: Any, doc: Document, state_dir: Path, executor: ThreadPoolExecutor, **options: Any) -> Any:
    model = options_model(f"{handler.__module__}:{handler.__name__}")
    assert model is not None
    ctx = PhaseContext(
        "extraction", Levers(1, 5, 2), model(**options), state_dir=state_dir, executor=executor
    )
    return asyncio.run(handler(doc, ctx))


def extract_file(path: Path, executor: ThreadPoolExecutor, **options: Any) -> dict[str, Any]:
    return run(extract, Document(path.stem, path.name, path), path.parent, executor, **options)


def failure(path: Path, executor: ThreadPoolExecutor, **options: Any) -> str:
    with pytest.raises(ExtractionError) as caught:
        extract_file(path, executor, **options)
    message = str(caught.value)
    assert "\n" not in message
    assert isinstance(caught.value, Permanent)  # no retry can fix the input: the document fails at once
    return message


def make_pdf(pages: list[tuple[str, str]], title: str | None = None) -> bytes:
    """A PDF with one (heading, body) per page and a bookmark per heading."""
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.set_font("helvetica", size=12)
    for heading, body in pages:
        pdf.add_page()
        pdf.start_section(heading)
        pdf.multi_cell(0, 8, f"{heading}\n{body}")
    return bytes(pdf.output())


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("name", "format_", "title"),
    [
        ("capacity-planning.md", "markdown", "Capacity Planning for Document Pipelines"),
        ("queues-and-backpressure.txt", "text", "Queues and Backpressure in Batch Ingestion"),
        ("retries-and-timeouts.html", "html", "Retries, Timeouts and Dead Letters"),
        ("pipeline-operations.pdf", "pdf", "Operating a Phased Document Pipeline"),
        ("concurrency-levers.docx", "docx", "Tuning Concurrency: Workers, Semaphores and Threads"),
    ],
)
def test_examples_extract_with_title_and_consistent_offsets(
    name: str, format_: str, title: str, executor: ThreadPoolExecutor
) -> None:
    out = extract_file(EXAMPLES / name, executor)
    assert (out["format"], out["title"]) == (format_, title)
    assert out["chars"] == len(out["text"]) > 1000
    assert out["pages"] == len(out["page_offsets"]) and out["page_offsets"][0] == 0
    assert out["page_offsets"] == sorted(out["page_offsets"])
    for heading in out["headings"]:
        assert heading["text"] in out["text"][heading["offset"] :].split("\n", 1)[0]
    if format_ != "text":
        assert out["headings"], "every structured example has headings"


def test_example_pdf_has_three_pages_with_outline_headings(executor: ThreadPoolExecutor) -> None:
    out = extract_file(EXAMPLES / "pipeline-operations.pdf", executor)
    assert out["pages"] == 3
    starts = [out["text"][offset:].split("\n", 1)[0] for offset in out["page_offsets"][1:]]
    assert starts == ["Watching Queue Depth", "Failures and Retries"]
    assert [h["text"] for h in out["headings"]] == [
        "Phases and Handoffs",
        "Watching Queue Depth",
        "Failures and Retries",
    ]


def test_generated_pdf_pages_offsets_and_metadata_title(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    pages = [("Alpha", "First page body."), ("Beta", "Second page body."), ("Gamma", "Third.")]
    out = extract_file(write(tmp_path, "gen.pdf", make_pdf(pages, title="Generated")), executor)
    assert out["title"] == "Generated"
    assert out["pages"] == 3
    for offset, (heading, body) in zip(out["page_offsets"], pages, strict=True):
        assert out["text"][offset:].startswith(f"{heading}\n{body}")
    assert [(h["level"], h["offset"]) for h in out["headings"]] == [(1, o) for o in out["page_offsets"]]


def test_pdf_without_metadata_title_takes_first_line(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    out = extract_file(write(tmp_path, "untitled.pdf", make_pdf([("Opening line", "Body.")])), executor)
    assert out["title"] == "Opening line"


def test_docx_paragraphs_and_tables_in_document_order(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    document = docx.Document()
    document.add_heading("Runbook", level=1)
    document.add_paragraph("Before the table.")
    table = document.add_table(rows=2, cols=3)
    table.cell(0, 0).merge(table.cell(0, 1)).text = "Merged header"
    table.cell(0, 2).text = "Owner"
    for column, text in enumerate(["a", "b", "ops"]):
        table.cell(1, column).text = text
    document.add_heading("After", level=2)
    document.add_paragraph("After the table.")
    buffer = io.BytesIO()
    document.save(buffer)
    out = extract_file(write(tmp_path, "runbook.docx", buffer.getvalue()), executor)
    assert out["text"] == (
        "Runbook\n\nBefore the table.\n\nMerged header | Owner\na | b | ops\n\nAfter\n\nAfter the table."
    )
    assert out["title"] == "Runbook"
    assert [(h["level"], h["text"]) for h in out["headings"]] == [(1, "Runbook"), (2, "After")]
    assert out["text"][out["headings"][1]["offset"] :].startswith("After\n")


def test_markdown_headings_skip_code_fences(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    text = "intro line\n\n# Top\n\n```\n# not a heading\n```\n\nSub\n---\n\n### Deep ###\nbody\n"
    out = extract_file(write(tmp_path, "notes.md", text.encode()), executor)
    assert [(h["level"], h["text"]) for h in out["headings"]] == [(1, "Top"), (2, "Sub"), (3, "Deep")]
    assert [out["text"][h["offset"] : h["offset"] + 3] for h in out["headings"]] == ["# T", "Sub", "###"]
    assert out["title"] == "Top"


def test_html_drops_scripts_and_falls_back_to_h1_title(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    html = (
        "<html><head><style>p {color: red}</style><script>var secret = 1;</script></head><body>"
        "<h1>Main &amp; only</h1><p>One <b>bold</b><br>two</p><ul><li>item</li></ul></body></html>"
    )
    out = extract_file(write(tmp_path, "page.htm", html.encode()), executor)
    assert out["text"] == "Main & only\n\nOne bold\ntwo\n\nitem"
    assert out["title"] == "Main & only"


def test_latin1_text_is_decoded(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    text = "Café crème brûlée\nLa façade naïve du théâtre."
    out = extract_file(write(tmp_path, "menu.txt", text.encode("latin-1")), executor)
    assert out["text"] == text
    assert out["title"] == "Café crème brûlée"


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.txt", b"", "empty file"),
        ("blank.md", b" \n\n \n", "no text"),
        ("junk.txt", bytes(range(256)) * 40, "binary content"),
        ("fake.pdf", b"This is plain text pretending to be a PDF.", "not a PDF"),
        ("zip.pdf", b"PK\x03\x04rest", "content is a ZIP archive"),
        ("fake.docx", b"plain text, not a zip", "not a DOCX"),
        ("broken.docx", b"PK\x03\x04not really a zip", "corrupt DOCX"),
        ("pdf.txt", b"%PDF-1.7\n...", "content is a PDF, not text"),
        ("sheet.xlsx", b"data", "unsupported file type '.xlsx'"),
    ],
)
def test_bad_input_fails_with_one_line_reason(
    tmp_path: Path, executor: ThreadPoolExecutor, name: str, data: bytes, reason: str
) -> None:
    assert reason in failure(write(tmp_path, name, data), executor)


def test_truncated_pdf_fails(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    data = make_pdf([("Page", "Body text.")] * 3)
    assert "truncated PDF" in failure(write(tmp_path, "cut.pdf", data[: len(data) // 2]), executor)


def test_corrupt_pdf_with_trailer_fails(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    data = b"%PDF-1.4\n" + b"garbage " * 50 + b"\n%%EOF\n"
    assert "corrupt PDF" in failure(write(tmp_path, "corrupt.pdf", data), executor)


def test_encrypted_pdf_fails(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(0, 10, "secret")
    pdf.set_encryption(owner_password="owner", user_password="user")
    assert "encrypted PDF" in failure(write(tmp_path, "locked.pdf", bytes(pdf.output())), executor)


def test_pdf_without_text_layer_fails(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    pdf = FPDF()
    pdf.add_page()
    pdf.rect(20, 20, 100, 60, style="F")  # a drawing stands in for a scanned image
    assert failure(write(tmp_path, "scan.pdf", bytes(pdf.output())), executor) == NO_TEXT_LAYER


def test_size_and_page_limits(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    path = write(tmp_path, "three.pdf", make_pdf([("P", "Body.")] * 3))
    assert "over max_bytes 100" in failure(path, executor, max_bytes=100)
    assert "3 pages, over max_pages 2" in failure(path, executor, max_pages=2)
    assert extract_file(path, executor, max_pages=3, max_bytes=path.stat().st_size)["pages"] == 3


def test_ingest_extract_parses_bytes_without_touching_disk(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    data = (EXAMPLES / "pipeline-operations.pdf").read_bytes()
    out = run(ingest, Document("up-1", "upload.pdf", data), tmp_path, executor)
    assert out == extract_file(EXAMPLES / "pipeline-operations.pdf", executor)
    assert list(tmp_path.iterdir()) == []


def test_ingest_extract_refuses_oversized_bytes_by_default(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    doc = Document("big", "big.txt", b"a" * (DEFAULT_MAX_BYTES + 1))
    with pytest.raises(ExtractionError, match=f"over max_bytes {DEFAULT_MAX_BYTES}"):
        run(ingest, doc, tmp_path, executor)
    with pytest.raises(ExtractionError, match="over max_bytes 10"):
        run(ingest, Document("small", "small.txt", b"eleven byte"), tmp_path, executor, max_bytes=10)
