"""Probing recordings before any upload: container by the first bytes, hash, size, duration."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from phases.audio import FALLBACK_BYTES_PER_S, NotAudio, container, probe
from tests.audio_files import BROKEN_MP3, wav

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "audio" / "levers-overview.wav"


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (wav(0.1)[:16], "wav"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00", "mp3"),
        (b"\xff\xfb\x90\x64\x00", "mp3"),
        (b"\xff\xf1\x50\x80\x02", "mp3"),  # ADTS AAC shares the MPEG sync
        (b"OggS\x00\x02\x00\x00", "ogg"),
        (b"fLaC\x00\x00\x00\x22", "flac"),
        (b"\x00\x00\x00\x20ftypM4A \x00\x00", "mp4"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00", "mp4"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81", "webm"),
        (b"Hello, this is plain text", None),
        (b"%PDF-1.7\n", None),
        (b"RIFF\x24\x00\x00\x00AVI LIST", None),  # RIFF, but a video container without audio magic
    ],
)
def test_containers_are_known_by_their_first_bytes(head: bytes, kind: str | None) -> None:
    assert container(head) == kind


def test_a_wav_file_is_hashed_and_timed_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "talk.wav"
    path.write_bytes(wav(3.5, "Some words."))

    recording = probe(path)

    assert recording.container == "wav" and recording.size == path.stat().st_size
    assert recording.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (recording.duration_s, recording.duration_from) == (3.5, "header")
    assert probe(path.read_bytes()) == recording  # in-memory documents probe the same


def test_the_example_recording_is_a_few_seconds_of_speech() -> None:
    recording = probe(EXAMPLE)
    assert recording.container == "wav" and 3 <= recording.duration_s <= 15
    assert recording.size < 300_000


def test_an_unreadable_header_falls_back_to_a_long_estimate_from_the_size(tmp_path: Path) -> None:
    recording = probe(BROKEN_MP3)
    webm = b"\x1a\x45\xdf\xa3" + bytes(40_000)

    assert recording.container == "mp3" and recording.duration_from == "size"
    assert recording.duration_s == len(BROKEN_MP3) / FALLBACK_BYTES_PER_S
    assert probe(webm).duration_s == len(webm) / FALLBACK_BYTES_PER_S  # mutagen does not read WebM


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"These are meeting notes, not a recording.\n", "not an audio file: it starts like text"),
        (b"%PDF-1.4\n...", "it starts like a PDF"),
        (b"\x00\x01\x02\x03\x80\x81\x82", "unrecognised binary data"),
    ],
)
def test_bytes_that_are_not_audio_are_refused_in_one_line(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "notes.mp3"
    path.write_bytes(data)

    with pytest.raises(NotAudio) as caught:
        probe(path)

    assert reason in str(caught.value) and "\n" not in str(caught.value)
