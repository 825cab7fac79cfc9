"""Extraction phase: text, page offsets and headings from .txt, .md/.markdown, .html/.htm, .pdf, .docx.

``extract_bytes`` is the pure parser (bytes in, output dict out) that ``ingest_extract`` reuses;
``extract`` is the handler, which runs it on the phase's thread pool. A document that cannot be
extracted raises ``ExtractionError`` with a one-line reason; that fails this document alone.

Output: ``{"format", "title", "text", "pages", "page_offsets", "headings", "chars"}``.
``page_offsets[i]`` is where page i+1 starts in ``text`` (one page at 0 for formats without
pages); a heading is ``{"level", "text", "offset"}``. Text has "\\n" line ends, and blocks (pages,
paragraphs, tables) are separated by blank lines so chunking can find them.

Options (``Options``): ``max_bytes`` (fail documents larger than this) and ``max_pages`` (fail PDFs
with more pages), both unlimited when unset.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Annotated, Any

import charset_normalizer
import docx
import pypdfium2 as pdfium
from docx.opc.exceptions import OpcError
from docx.table import Table
from docx.text.paragraph import Paragraph
from pydantic import Field
from selectolax.lexbor import LexborHTMLParser, LexborNode

from levers import Document, Permanent, PhaseContext, PhaseOptions

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx")
NO_TEXT_LAYER = "no text layer (scanned PDF? OCR is not supported)"
# Share of control characters above which a "text" file is taken for binary data.
MAX_CONTROL_SHARE = 0.01
TITLE_MAX_CHARS = 200
# Bounds of the options: a terabyte, a million pages; far above any document.
MAX_BYTES = 1 << 40
MAX_PAGES = 1_000_000
# How close charset-normalizer's scores must be for cp1252 to win over its first choice.
CODEPAGE_TIE_CHAOS = 0.02
CODEPAGE_TIE_COHERENCE = 0.05

# PDFium is not thread-safe: one process parses one PDF at a time, whatever the threads lever.
_PDFIUM_LOCK = threading.Lock()

_MAGIC = (
    (b"%PDF", "a PDF"), (b"PK\x03\x04", "a ZIP archive"), (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"), (b"\x1f\x8b", "gzip data"),
    (b"\xd0\xcf\x11\xe0", "an old-style Office file"),
)  # fmt: skip
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f\ufffd]")
_SPACES = re.compile(r"\s+")
_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_DOCX_HEADING = re.compile(r"^Heading ([1-9])$")

_HTML_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_HTML_SKIP = frozenset(
    {"-comment", "head", "script", "style", "noscript", "template", "svg", "iframe", "object", "canvas"}
)
_HTML_BLOCKS = frozenset(
    {
        "address", "article", "aside", "blockquote", "caption", "dd", "details", "div", "dl", "dt",
        "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "li", "main", "nav",
        "ol", "p", "section", "summary", "table", "tr", "ul",
    }
)  # fmt: skip


class ExtractionError(Permanent, ValueError):
    """A document that cannot be extracted; the message is the one-line reason. No retry can fix
    it, so the document fails at once."""


class Options(PhaseOptions):
    """extraction's options in pipeline.yaml."""

    max_bytes: Annotated[
        int | None, Field(ge=1, le=MAX_BYTES, description="Documents larger than this fail unread.")
    ] = None
    max_pages: Annotated[
        int | None, Field(ge=1, le=MAX_PAGES, description="PDFs with more pages than this fail.")
    ] = None


@dataclass
class Extraction:
    """A parsed document before the common checks; ``title`` may still be empty."""

    format: str
    text: str
    title: str = ""
    page_offsets: list[int] = field(default_factory=lambda: [0])
    headings: list[dict[str, Any]] = field(default_factory=list)

    def as_output(self) -> dict[str, Any]:
        return {**asdict(self), "pages": len(self.page_offsets), "chars": len(self.text)}


def _join_blocks(blocks: Iterable[tuple[int, str]]) -> tuple[str, list[dict[str, Any]]]:
    """(heading level or 0, text) blocks joined by blank lines, and the headings with offsets."""
    parts: list[str] = []
    headings: list[dict[str, Any]] = []
    offset = 0
    for level, block in blocks:
        text = block.strip()
        if text:
            if level:
                headings.append({"level": level, "text": _squash(text), "offset": offset})
            parts.append(text)
            offset += len(text) + 2
    return "\n\n".join(parts), headings


def _first_h1(headings: list[dict[str, Any]]) -> str:
    return next((h["text"] for h in headings if h["level"] == 1), "")


async def extract(doc: Document, ctx: PhaseContext[Options]) -> dict[str, Any]:
    """Handler: extract one stored or in-memory document; parsing runs on the thread pool."""
    check_size(doc.size, ctx.options.max_bytes)
    data = await ctx.run_in_thread(doc.read_bytes)
    return await ctx.run_in_thread(extract_bytes, data, doc.name, ctx.options.max_pages)


def check_size(size: int, max_bytes: int | None) -> None:
    """Fail a document over ``max_bytes`` before any of it is read or parsed."""
    if max_bytes is not None and size > int(max_bytes):
        raise ExtractionError(f"document is {size} bytes, over max_bytes {int(max_bytes)}")


def extract_bytes(data: bytes, name: str, max_pages: int | None = None) -> dict[str, Any]:
    """Parse ``data`` by the extension of ``name``; raises ExtractionError for bad input."""
    suffix = Path(name).suffix.lower()
    parsers: dict[str, Callable[[bytes], Extraction]] = {
        ".txt": parse_text,
        ".md": parse_markdown,
        ".markdown": parse_markdown,
        ".html": parse_html,
        ".htm": parse_html,
        ".pdf": lambda pdf: parse_pdf(pdf, max_pages),
        ".docx": parse_docx,
    }
    parser = parsers.get(suffix)
    if parser is None:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise ExtractionError(f"unsupported file type {suffix or '(no extension)'!r}; supported: {supported}")
    if not data:
        raise ExtractionError("empty file")
    result = parser(data)
    if not result.text.strip():
        raise ExtractionError(f"no text in this {result.format} document")
    result.title = _squash(result.title)[:TITLE_MAX_CHARS] or _first_line(result.text) or Path(name).stem
    return result.as_output()


def decode_text(data: bytes, expected: str) -> str:
    """Decode bytes of a text format, refusing binary content; line ends become "\\n".

    Valid UTF-8 is taken as it is, as guessing can only get it wrong; anything else is detected
    by charset-normalizer, and latin-1 (which maps every byte) is the last resort.
    """
    kind = _sniff(data)
    if kind is not None:
        raise ExtractionError(f"content is {kind}, not {expected}")
    text: str | None = None
    if b"\x00" not in data:  # NUL bytes mean UTF-16/32 or binary: let the detector decide
        with contextlib.suppress(UnicodeDecodeError):
            text = data.decode("utf-8-sig")
    text = text if text is not None else _detect_and_decode(data)
    share = len(_CONTROL.findall(text)) / max(len(text), 1)
    if share > MAX_CONTROL_SHARE:
        raise ExtractionError(f"binary content in a {expected} file ({share:.0%} control bytes)")
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def _detect_and_decode(data: bytes) -> str:
    """Decode with charset-normalizer's guess, giving near-ties to cp1252 (latin-1's superset):
    on short Western text it scores cp1250/cp1257/cp775 as high and may pick one ("crčme")."""
    matches = charset_normalizer.from_bytes(data)
    best = matches.best()
    if best is None:
        return data.decode("latin-1")
    for match in matches:
        if (
            match.encoding in ("cp1252", "latin_1")
            and match.chaos <= best.chaos + CODEPAGE_TIE_CHAOS
            and match.coherence >= best.coherence - CODEPAGE_TIE_COHERENCE
        ):
            return str(match)
    return str(best)


def parse_text(data: bytes) -> Extraction:
    """Plain text: no headings; the title is the first line."""
    return Extraction("text", decode_text(data, "text"))


def parse_markdown(data: bytes) -> Extraction:
    """Markdown kept as written; ATX (#) and setext headings outside code fences are headings."""
    text = decode_text(data, "Markdown")
    headings = list(_markdown_headings(text))
    return Extraction("markdown", text, title=_first_h1(headings), headings=headings)


def _markdown_headings(text: str) -> Iterator[dict[str, Any]]:
    offset = 0
    in_fence = False
    previous: tuple[int, str] | None = None  # the last plain paragraph line, for setext underlines
    for line in text.split("\n"):
        start, offset = offset, offset + len(line) + 1
        if _FENCE.match(line):
            in_fence, previous = not in_fence, None
            continue
        if in_fence:
            continue
        atx = _ATX_HEADING.match(line)
        underline = _SETEXT_UNDERLINE.match(line)
        if atx:
            yield {"level": len(atx.group(1)), "text": atx.group(2).strip(), "offset": start}
            previous = None
        elif underline and previous is not None:
            level = 1 if underline.group(1).startswith("=") else 2
            yield {"level": level, "text": previous[1], "offset": previous[0]}
            previous = None
        else:
            previous = (start, line.strip()) if line.strip() else None


def parse_html(data: bytes) -> Extraction:
    """HTML through lexbor: one block per paragraph-like element, h1-h6 as headings."""
    tree = LexborHTMLParser(decode_text(data, "HTML"))
    text, headings = _join_blocks(_html_blocks(tree.body or tree.root))
    title_node = tree.css_first("title")
    title = title_node.text() if title_node is not None else ""
    return Extraction("html", text, title=title.strip() or _first_h1(headings), headings=headings)


def _html_blocks(root: LexborNode | None) -> Iterator[tuple[int, str]]:
    """(heading level or 0, text) per block, in document order.

    Walks with an explicit stack so deeply nested markup cannot exhaust Python's recursion limit.
    ``None`` on the stack marks the end of a block element.
    """
    inline: list[str] = []
    stack: list[LexborNode | None] = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if node is None:
            yield 0, _join_inline(inline)
            continue
        tag = node.tag
        if tag == "-text":
            inline.append(_SPACES.sub(" ", node.text_content or ""))
        elif tag == "br":
            inline.append("\n")
        elif tag in _HTML_HEADINGS or tag == "pre":
            yield 0, _join_inline(inline)
            yield _HTML_HEADINGS.get(tag, 0), node.text(separator=" " if tag != "pre" else "")
        elif tag not in _HTML_SKIP:
            if tag in _HTML_BLOCKS:
                yield 0, _join_inline(inline)
                stack.append(None)
            elif tag in ("td", "th") and any(part.strip() for part in inline):
                inline.append(" | ")
            stack.extend(reversed(list(node.iter(include_text=True))))
    yield 0, _join_inline(inline)


def _join_inline(inline: list[str]) -> str:
    """Empty the inline buffer into one block: whitespace squashed, <br> line breaks kept."""
    lines = "".join(inline).split("\n")
    inline.clear()
    return "\n".join(squashed for line in lines if (squashed := _squash(line)))


def parse_pdf(data: bytes, max_pages: int | None = None) -> Extraction:
    """PDF through PDFium: one block per page; the outline (bookmarks) gives the headings."""
    if b"%PDF" not in data[:1024]:
        kind = _sniff(data)
        raise ExtractionError(f"not a PDF: content is {kind}" if kind else "not a PDF (no %PDF header)")
    # PDFium silently recovers what it can from a cut-off file; a missing trailer is the tell.
    if b"%%EOF" not in data[-1024:]:
        raise ExtractionError("truncated PDF (no %%EOF trailer)")
    with _PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            if "password" in str(exc).lower():
                raise ExtractionError("encrypted PDF (a password is needed to open it)") from None
            raise ExtractionError(f"corrupt PDF: {exc}") from None
        try:
            return _read_pdf(pdf, max_pages)
        finally:
            pdf.close()


def _read_pdf(pdf: pdfium.PdfDocument, max_pages: int | None) -> Extraction:
    count = len(pdf)
    if count == 0:
        raise ExtractionError("PDF has no pages")
    if max_pages is not None and count > int(max_pages):
        raise ExtractionError(f"PDF has {count} pages, over max_pages {int(max_pages)}")
    pages = [_page_text(pdf, index) for index in range(count)]
    if not any(pages):
        raise ExtractionError(NO_TEXT_LAYER)
    offsets = [0, *accumulate(len(page) + 2 for page in pages[:-1])]
    text = "\n\n".join(pages)
    headings = _pdf_outline(pdf, text, offsets)
    title = str(pdf.get_metadata_dict().get("Title", ""))
    return Extraction("pdf", text, title=title, page_offsets=offsets, headings=headings)


def _page_text(pdf: pdfium.PdfDocument, index: int) -> str:
    page = pdf[index]
    try:
        textpage = page.get_textpage()
        try:
            text = str(textpage.get_text_bounded())
        finally:
            textpage.close()
    except pdfium.PdfiumError as exc:
        raise ExtractionError(f"corrupt PDF: page {index + 1}: {exc}") from None
    finally:
        page.close()
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _pdf_outline(pdf: pdfium.PdfDocument, text: str, offsets: list[int]) -> list[dict[str, Any]]:
    """Bookmarks as headings, placed where their title appears on their page (else page start)."""
    headings = []
    for bookmark in pdf.get_toc():
        dest = bookmark.get_dest()
        index = dest.get_index() if dest is not None else None
        title = _squash(bookmark.get_title())
        if index is None or not 0 <= index < len(offsets) or not title:
            continue
        page_end = offsets[index + 1] if index + 1 < len(offsets) else len(text)
        found = text.find(title, offsets[index], page_end)
        offset = found if found >= 0 else offsets[index]
        headings.append({"level": bookmark.level + 1, "text": title, "offset": offset})
    return sorted(headings, key=lambda heading: heading["offset"])


def parse_docx(data: bytes) -> Extraction:
    """DOCX through python-docx: paragraphs and tables in document order; Heading N styles."""
    if not data.startswith(b"PK\x03\x04"):
        kind = _sniff(data)
        raise ExtractionError(f"not a DOCX: content is {kind}" if kind else "not a DOCX (not a ZIP archive)")
    try:
        document = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, OpcError, KeyError, ValueError, SyntaxError) as exc:
        raise ExtractionError(f"corrupt DOCX: {_squash(str(exc)) or type(exc).__name__}") from None
    text, headings = _join_blocks(_docx_blocks(document))
    title = document.core_properties.title or _first_h1(headings)
    return Extraction("docx", text, title=title, headings=headings)


def _docx_blocks(document: Any) -> Iterator[tuple[int, str]]:
    for item in document.iter_inner_content():
        if isinstance(item, Table):
            yield 0, _table_text(item)
        else:
            yield _docx_heading_level(item.style.name if item.style is not None else None), item.text


def _docx_heading_level(style: str | None) -> int:
    if style == "Title":
        return 1
    match = _DOCX_HEADING.match(style or "")
    return int(match.group(1)) if match else 0


def _table_text(table: Table) -> str:
    """One line per row, cells separated by " | "; nested tables are flattened into their cell."""
    rows = []
    for row in table.rows:
        cells: list[str] = []
        previous = None
        for cell in row.cells:
            # python-docx repeats a merged cell once per grid column it spans.
            if previous is not None and cell._tc is previous._tc:
                continue
            previous = cell
            parts = (
                item.text if isinstance(item, Paragraph) else _table_text(item)
                for item in cell.iter_inner_content()
            )
            cells.append(_squash(" ".join(parts)))
        if any(cells):
            rows.append(" | ".join(cells))
    return "\n".join(rows)


def _sniff(data: bytes) -> str | None:
    """What a known binary format's magic bytes say the content is, if any."""
    return next((kind for magic, kind in _MAGIC if data.startswith(magic)), None)


def _squash(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _first_line(text: str) -> str:
    line = next((line for line in text.split("\n") if line.strip()), "")
    return _squash(line.lstrip("#"))[:TITLE_MAX_CHARS]
