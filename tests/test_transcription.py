"""The transcription phase: the real deepgram-sdk against the stand-in on 127.0.0.1, in one process.

Each test runs the handler as a job would (a PhaseContext with the artifact store, and with the
shared limits where it says so) on recordings the tests make.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from levers import Permanent
from levers.documents.store import ArtifactStore, LocalStore
from levers.limits.shared import JobLimits
from levers.limits.status import limits_status
from levers.pipeline.model import LimitSettings, Phase, Pipeline
from levers.pipeline.outline import outline_of
from levers.worker.phase_context import Document, Levers, PhaseContext
from phases.audio import NotAudio
from phases.deepgram_api import TranscriptionError
from phases.transcription import Options, transcribe
from tests.audio_files import BROKEN_MP3, write_wav
from tests.fake_deepgram import FakeDeepgram

SCRIPT = (
    "The Redis Queue feeds the PDF Parser. Workers wait for jobs. Slots come back. "
    "Deepgram hears every word. Chunks keep their times. The end is near."
)
PIPELINE = "transcription-test"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDeepgram]:
    with FakeDeepgram() as server:
        monkeypatch.setenv("DEEPGRAM_API_KEY", server.api_key)
        monkeypatch.setenv("DEEPGRAM_BASE_URL", server.url)
        yield server


def run(
    path: Path, store: ArtifactStore | None, limits: tuple[Pipeline, str] | None = None, **options: Any
) -> dict[str, Any]:
    """The handler on the file at ``path``, as a job runs it; ``limits`` is (pipeline, redis url)."""
    return asyncio.run(job(path, store, limits, **options))


async def job(
    path: Path, store: ArtifactStore | None, limits: tuple[Pipeline, str] | None = None, **options: Any
) -> dict[str, Any]:
    job_limits = JobLimits(*limits) if limits else None
    with ThreadPoolExecutor(1) as pool:
        ctx = PhaseContext(
            "transcription", Levers(1, 1, 1), Options(**options), path.parent, pool, job_limits, store
        )
        try:
            return await transcribe(Document("doc", path.name, path), ctx)
        finally:
            if job_limits is not None:
                await job_limits.aclose()


def deepgram_limit(concurrency: int = 2) -> Pipeline:
    return Pipeline(
        name=PIPELINE,
        phases={"transcription": Phase(handler="phases.transcription:transcribe", accepts=["*"])},
        limits={"deepgram": LimitSettings(concurrency=concurrency)},
    )


def test_a_recording_becomes_text_with_paragraphs_and_word_timings(
    fake: FakeDeepgram, tmp_path: Path
) -> None:
    path = write_wav(tmp_path / "standup.wav", 12.0, SCRIPT)

    out = run(path, LocalStore(tmp_path / "store"))

    assert (out["format"], out["title"], out["model"], out["language"]) == (
        "audio",
        "standup",
        "nova-3",
        "en",
    )
    assert out["duration_s"] == 12.0 and out["cached"] is False and out["request_id"]
    assert out["text"].split("\n\n") == [
        "The Redis Queue feeds the PDF Parser. Workers wait for jobs. Slots come back.",
        "Deepgram hears every word. Chunks keep their times. The end is near.",
    ]
    assert out["chars"] == len(out["text"]) and out["page_offsets"] == [0] and out["headings"] == []
    for word in out["words"]:
        assert out["text"][word["offset"] : word["offset"] + len(word["word"])] == word["word"]
        assert 0 <= word["start_s"] < word["end_s"] <= 12.0
    assert [p["offset"] for p in out["paragraphs"]] == [0, out["text"].index("Deepgram")]
    assert out["paragraphs"][1]["start_s"] == out["words"][14]["start_s"]
    query = fake.requests[0].query
    assert query == {
        "model": "nova-3", "language": "en", "smart_format": "true", "punctuate": "true",
        "paragraphs": "true", "diarize": "false",
    }  # fmt: skip


def test_diarized_paragraphs_name_their_speaker(fake: FakeDeepgram, tmp_path: Path) -> None:
    path = write_wav(tmp_path / "call.wav", 12.0, SCRIPT)

    out = run(path, None, diarize=True, model="nova-2", language="en-GB")

    assert out["text"].startswith("Speaker 0: The Redis Queue") and "\n\nSpeaker 1: Deepgram" in out["text"]
    assert [p["speaker"] for p in out["paragraphs"]] == [0, 1] and out["words"][-1]["speaker"] == 1
    assert out["model"] == "nova-2" and out["language"] == "en-GB"
    assert fake.requests[0].query["diarize"] == "true"


def test_the_file_is_streamed_with_its_size_never_read_whole(
    fake: FakeDeepgram, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_wav(tmp_path / "long.wav", 30.0, SCRIPT)

    def read_whole(self: Path) -> bytes:
        raise AssertionError(f"{self} read whole into memory")

    monkeypatch.setattr(Path, "read_bytes", read_whole)
    monkeypatch.setattr(Document, "read_bytes", read_whole)
    monkeypatch.setattr("phases.deepgram_api.STREAM_BLOCK_BYTES", 16_384)
    out = run(path, None)

    assert out["text"].startswith("The Redis Queue")
    request = fake.requests[0]
    assert request.headers["content-length"] == str(path.stat().st_size) and not request.chunked


def test_jobs_on_one_event_loop_share_one_kept_alive_connection(fake: FakeDeepgram, tmp_path: Path) -> None:
    paths = [write_wav(tmp_path / f"r{n}.wav", 1.0, f"Recording {n}.") for n in range(3)]

    async def one_worker() -> list[dict[str, Any]]:
        return [await job(path, None) for path in paths]  # a worker's jobs share its loop

    texts = [out["text"] for out in asyncio.run(one_worker())]
    run(paths[0], None)  # another loop: another worker

    assert texts == ["Recording 0.", "Recording 1.", "Recording 2."]
    ports = [request.client_port for request in fake.requests]
    assert ports[0] == ports[1] == ports[2] != ports[3]


def test_the_same_audio_again_makes_no_call_on_any_name_and_new_options_do(
    fake: FakeDeepgram, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    first = write_wav(tmp_path / "a" / "meeting.wav", 6.0, SCRIPT)
    again = tmp_path / "b" / "meeting-copy.wav"
    again.parent.mkdir()
    again.write_bytes(first.read_bytes())

    done = run(first, store)
    repeated = run(again, store)
    other_model = run(first, store, model="nova-2")

    assert fake.transcribed == 2
    assert repeated["cached"] is True and repeated["title"] == "meeting-copy"
    assert repeated["text"] == done["text"] and repeated["words"] == done["words"]
    assert other_model["cached"] is False and fake.requests[1].query["model"] == "nova-2"
    assert len(list((tmp_path / "store" / "cache" / "transcripts").glob("*/*.json"))) == 2


def test_without_a_key_it_fails_in_one_line_naming_the_key_unless_cached(
    fake: FakeDeepgram, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    known = write_wav(tmp_path / "known.wav", 3.0, "Heard before.")
    run(known, store)
    monkeypatch.delenv("DEEPGRAM_API_KEY")

    with pytest.raises(TranscriptionError) as caught:
        run(write_wav(tmp_path / "new.wav", 3.0, "Never heard."), store)

    message = str(caught.value)
    assert "DEEPGRAM_API_KEY is not set" in message and "DEEPGRAM_BASE_URL" in message and "\n" not in message
    assert fake.transcribed == 1
    assert run(known, store)["text"] == "Heard before."  # a cached transcript needs no key


def test_a_text_file_named_mp3_fails_at_once_without_a_call(fake: FakeDeepgram, tmp_path: Path) -> None:
    path = tmp_path / "notes.mp3"
    path.write_text("Action items: ship the transcription phase.\n")

    with pytest.raises(NotAudio, match=r"^not an audio file: it starts like text") as caught:
        run(path, None)

    assert isinstance(caught.value, Permanent)
    assert fake.requests == []


def test_a_corrupt_recording_fails_with_the_provider_s_message(fake: FakeDeepgram, tmp_path: Path) -> None:
    path = tmp_path / "broken.mp3"
    path.write_bytes(BROKEN_MP3)

    with pytest.raises(TranscriptionError) as caught:
        run(path, None)

    assert str(caught.value) == (
        "Deepgram error 400: Bad Request: failed to process audio: corrupt or unsupported data"
    )
    assert isinstance(caught.value, Permanent)  # the same bytes would be refused again
    assert len(fake.requests) == 1


def test_a_wrong_key_says_which_variable_to_check(
    fake: FakeDeepgram, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPGRAM_API_KEY", "a-revoked-key")

    with pytest.raises(TranscriptionError) as caught:
        run(write_wav(tmp_path / "x.wav", 1.0), None)

    assert (
        str(caught.value) == "Deepgram error 401 INVALID_AUTH: Invalid credentials. (check DEEPGRAM_API_KEY)"
    )
    assert "a-revoked-key" not in str(caught.value)


def test_server_errors_and_429s_are_retried_under_the_shared_limit(
    fake: FakeDeepgram, tmp_path: Path, redis_url: str
) -> None:
    fake.fail_next(1, status=502)  # no retry-after: backs off 0.5-1 s
    fake.fail_next(1, status=503, retry_after=0.2)
    fake.fail_next(1, status=429, retry_after=0.2)
    path = write_wav(tmp_path / "x.wav", 2.0, "Third time lucky.")

    out = run(path, None, limits=(deepgram_limit(), redis_url))

    assert out["text"] == "Third time lucky."
    assert len(fake.requests) == 4
    with redis.Redis.from_url(redis_url) as connection:
        totals = limits_status(connection, outline_of(deepgram_limit()), "deepgram")
    assert (totals["calls"], totals["rate_limited"], totals["in_flight"]) == (4, 1, 0)


def test_without_the_limit_a_server_error_fails_the_attempt(fake: FakeDeepgram, tmp_path: Path) -> None:
    fake.fail_next(1, status=503)

    with pytest.raises(
        TranscriptionError, match=r"^Deepgram error 503 SERVICE_UNAVAILABLE: Service unavailable$"
    ) as caught:
        run(write_wav(tmp_path / "x.wav", 1.0), None)

    assert not isinstance(caught.value, Permanent)  # the job's retries may get past it
    assert len(fake.requests) == 1


def test_the_timeout_grows_with_the_recording_s_duration(fake: FakeDeepgram, tmp_path: Path) -> None:
    fake.latency_per_audio_s = 0.05  # 1.5 s for 30 s of audio
    path = write_wav(tmp_path / "x.wav", 30.0, "Slow to transcribe.")

    with pytest.raises(TranscriptionError) as caught:
        run(path, None, request_timeout=0.5, timeout_per_audio_minute=0)
    out = run(path, None, request_timeout=0.5, timeout_per_audio_minute=10)  # 0.5 + 5 s

    assert str(caught.value).startswith("Deepgram did not answer within 0.5 s (the timeout grows with")
    assert not isinstance(caught.value, Permanent)
    assert out["text"] == "Slow to transcribe."
    assert Options(request_timeout=60, timeout_per_audio_minute=15).timeout_s(3600) == 60 + 900


def test_an_unreachable_endpoint_and_bad_options_are_one_line(
    fake: FakeDeepgram, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_wav(tmp_path / "x.wav", 1.0)
    monkeypatch.setenv("DEEPGRAM_BASE_URL", "http://user:secret@127.0.0.1:9")

    with pytest.raises(TranscriptionError) as unreachable:
        run(path, None)
    with pytest.raises(TranscriptionError) as not_a_url:
        run(path, None, base_url="api.deepgram.com")

    assert str(unreachable.value).startswith("could not reach Deepgram at http://127.0.0.1:9: ConnectError")
    assert "secret" not in str(unreachable.value)
    assert not isinstance(unreachable.value, Permanent)
    assert isinstance(not_a_url.value, Permanent)
    assert "is not an http(s) URL" in str(not_a_url.value)


def test_the_preload_module_sets_up_what_a_first_call_needs() -> None:
    check = (
        "import sys, phases.transcription_preload\n"
        "from phases.deepgram_api import _tls\n"
        "loaded = {'deepgram.listen.v1.media.client', 'anyio._backends._asyncio'} - set(sys.modules)\n"
        "assert not loaded, loaded\n"
        "assert _tls.cache_info().currsize == 1\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
