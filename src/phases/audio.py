"""What a recording is, read cheaply before any upload: its container, size, content hash and duration.

``probe`` reads a recording once, in blocks (never whole into memory), to hash it, and parses
its header for the duration. It runs on the phase's thread pool.

The container is recognised by its first bytes, as the provider itself recognises it (Deepgram
infers the format from the bytes, not the name): RIFF/WAVE, MP3 (an ID3 tag or an MPEG frame
sync; ADTS AAC shares the sync), Ogg (Vorbis, Opus), FLAC, an ISO base media file (``ftyp``:
MP4, M4A, MOV) and EBML (WebM, Matroska). Anything else is not sent: a text file named .mp3
fails at once, with no call.

The duration comes from the container's header through mutagen (WAV, MP3, MP4/M4A, Ogg, FLAC).
Where mutagen cannot tell (WebM, which it does not read, or a damaged header), it is estimated
from the size at ``FALLBACK_BYTES_PER_S``, a low bitrate, so that the estimate errs long: it only
sizes a timeout, and a timeout too long costs nothing while one too short fails a good file.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import mutagen

from levers import Permanent

# 32 kbit/s, under what speech is usually encoded at (MP3 and AAC podcasts: 48-128 kbit/s).
FALLBACK_BYTES_PER_S = 4_000
READ_BLOCK_BYTES = 1 << 20
# Enough for every signature below, including ftyp at offset 4 and FLAC behind an ID3 tag's header.
SNIFF_BYTES = 16

CONTAINERS = "WAV, MP3, M4A/MP4, Ogg/Opus, FLAC or WebM"


class NotAudio(Permanent, ValueError):
    """The bytes are not a recording levers can send; the message is the one-line reason (no retry
    can fix it)."""


@dataclass(frozen=True)
class Recording:
    """A recording as probed: container, size in bytes, SHA-256 of its bytes, duration in seconds."""

    container: str
    size: int
    sha256: str
    duration_s: float
    duration_from: str  # "header", or "size" when estimated from the size


def container(head: bytes) -> str | None:
    """The container the first bytes announce, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:3] == b"ID3":
        return "mp3"  # ID3 also heads some FLAC and AAC files; the provider reads past it
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "mp3"  # an MPEG audio frame sync (MP3, and ADTS AAC)
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    return None


def looks_like(head: bytes) -> str:
    """A few words on what non-audio bytes look like, for the error line."""
    if head.startswith(b"%PDF"):
        return "a PDF"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive (an Office document?)"
    if head[:1] in (b"<", b"{", b"["):
        return "markup or JSON"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    return "text"


def probe(content: bytes | Path) -> Recording:
    """Size, hash, container and duration of a recording; NotAudio when it is empty or not audio."""
    head = _head(content)
    if not head:
        raise NotAudio("empty file")
    kind = container(head)
    if kind is None:
        raise NotAudio(f"not an audio file: it starts like {looks_like(head)} (expected {CONTAINERS})")
    size, sha256 = _size_and_hash(content)
    duration = header_duration(content)
    if duration is None:
        return Recording(kind, size, sha256, size / FALLBACK_BYTES_PER_S, "size")
    return Recording(kind, size, sha256, duration, "header")


def header_duration(content: bytes | Path) -> float | None:
    """The duration the container's header gives, or None where mutagen cannot read it."""
    try:
        parsed = mutagen.File(io.BytesIO(content) if isinstance(content, bytes) else content)
    except Exception:  # mutagen raises many kinds for a damaged header; any of them means "unknown"
        return None
    length = getattr(getattr(parsed, "info", None), "length", None)
    return float(length) if isinstance(length, (int, float)) and length > 0 else None


def _head(content: bytes | Path) -> bytes:
    if isinstance(content, bytes):
        return content[:SNIFF_BYTES]
    with content.open("rb") as file:
        return file.read(SNIFF_BYTES)


def _size_and_hash(content: bytes | Path) -> tuple[int, str]:
    if isinstance(content, bytes):
        return len(content), hashlib.sha256(content).hexdigest()
    digest = hashlib.sha256()
    size = 0
    with content.open("rb") as file:
        while block := file.read(READ_BLOCK_BYTES):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()
