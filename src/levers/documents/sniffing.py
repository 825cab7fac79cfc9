"""A document's real type, from its first bytes, for names whose extension lies.

Only signatures that cannot be mistaken are read: a PDF header, a Word document's ZIP entries,
an HTML document's opening tag, and the containers of recordings. Text has no signature, so a
name's extension is believed unless the bytes carry one of these that says otherwise.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import PurePath

# A ZIP is read only up to this size to tell a Word document from another archive.
MAX_ZIP_SNIFF_BYTES = 256 * 1024 * 1024

# Extensions of one kind of content: a name is not lying when its extension is of the kind found.
_KINDS = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".html": "html",
    ".htm": "html",
    ".mp3": "audio",
    ".wav": "audio",
    ".m4a": "audio",
    ".mp4": "audio",
    ".ogg": "audio",
    ".opus": "audio",
    ".flac": "audio",
    ".webm": "audio",
}
# Kinds whose every document carries its signature: a name of such a kind whose bytes lack it lies.
_SIGNED = {"pdf", "docx", "audio"}


def sniffed_suffix(data: bytes) -> str | None:
    """The extension the bytes' signature says they are (".pdf", ".html", ".wav"...), or None."""
    head = data[:64]
    if head.lstrip(b" \t\r\n").startswith(b"%PDF-"):
        return ".pdf"
    if head.startswith(b"PK\x03\x04"):
        return ".docx" if _is_word(data) else None
    audio = _audio(head)
    if audio is not None:
        return audio
    text = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return ".html"
    return None


def routed_name(name: str, data: bytes, accepted: Callable[[str], bool]) -> str:
    """``name``, or ``name`` with the extension of what ``data`` really is when its own lies and
    the pipeline ``accepted`` the real one ("x.pdf" holding HTML: "x.html")."""
    path = PurePath(name)
    declared = _KINDS.get(path.suffix.lower())
    real = sniffed_suffix(data)
    if real is None or declared == _KINDS[real]:
        return name
    if declared not in _SIGNED and _KINDS[real] not in _SIGNED:
        return name  # HTML in a .txt or .md file is text all the same
    if not accepted(real):
        return name  # the phase says what the content is, in its error
    return f"{path.stem or path.name}{real}"


def _is_word(data: bytes) -> bool:
    if len(data) > MAX_ZIP_SNIFF_BYTES:
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return "word/document.xml" in archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _audio(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return ".wav"
    # an MPEG audio frame: 11 sync bits, then layer III (not FF FE, a UTF-16 byte order mark)
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE6 == 0xE2):
        return ".mp3"
    if head[4:8] == b"ftyp":
        return ".m4a"
    signatures = {b"OggS": ".ogg", b"fLaC": ".flac", b"\x1aE\xdf\xa3": ".webm"}
    return next((suffix for magic, suffix in signatures.items() if head.startswith(magic)), None)
