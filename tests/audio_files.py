"""Recordings made by the tests: WAV files of silence of a given length, saying what they are told.

A WAV made here carries its script in a LIST/INFO/ICMT chunk, which the Deepgram stand-in
"hears" (tests/fake_deepgram.py); to a real decoder it is an ordinary comment.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

from tests.fake_deepgram import with_script

RATE = 8_000


def wav(seconds: float, script: str | None = None, rate: int = RATE) -> bytes:
    """``seconds`` of 16-bit mono silence, with ``script`` as what it says."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(rate)
        audio.writeframes(b"\0\0" * round(rate * seconds))
    return with_script(buffer.getvalue(), script) if script else buffer.getvalue()


def write_wav(path: Path, seconds: float, script: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav(seconds, script))
    return path


# An MP3 by its name and its first bytes (an ID3 tag), and nothing a decoder can read after them.
BROKEN_MP3 = b"ID3\x03\x00\x00\x00\x00\x00\x0a" + bytes(range(256)) * 40
