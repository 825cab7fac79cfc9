"""The Deepgram stand-in, driven by the real ``deepgram-sdk`` over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
from deepgram.core.api_error import ApiError

from tests.audio_files import BROKEN_MP3, wav
from tests.fake_deepgram import FakeDeepgram

SCRIPT = "The Redis Queue feeds the PDF Parser. Workers wait for jobs. Slots come back. A fourth one."


@pytest.fixture
def fake() -> Iterator[FakeDeepgram]:
    with FakeDeepgram(concurrency=2) as server:
        yield server


def listen(fake: FakeDeepgram, body: Any, key: str | None = None, **options: Any) -> Any:
    """One transcribe_file call through the SDK, its retries off; the response or the ApiError."""

    async def call() -> Any:
        environment = DeepgramClientEnvironment(base=fake.url, production="", agent="", agent_rest="")
        async with httpx.AsyncClient() as http:
            client = AsyncDeepgramClient(
                api_key=key or fake.api_key, environment=environment, httpx_client=http, max_retries=0
            )
            try:
                return await client.listen.v1.media.transcribe_file(request=body, **options)
            except ApiError as exc:
                return exc

    return asyncio.run(call())


def test_the_sdk_gets_deepgram_s_response_shape(fake: FakeDeepgram) -> None:
    audio = wav(4.0, SCRIPT)

    response = listen(fake, audio, model="nova-3", smart_format=True, paragraphs=True, diarize=True)

    assert response.metadata.duration == 4.0 and response.metadata.channels == 1
    assert [m["name"] for m in response.metadata.model_info.values()] == ["nova-3"]
    alternative = response.results.channels[0].alternatives[0]
    assert alternative.transcript == SCRIPT
    first = alternative.words[0]
    assert (first.word, first.punctuated_word, first.speaker) == ("the", "The", 0)
    assert 0 <= first.start < first.end <= alternative.words[1].start
    assert alternative.words[-1].end <= 4.0
    paragraphs = alternative.paragraphs.paragraphs
    assert [p.num_words for p in paragraphs] == [14, 3] and [p.speaker for p in paragraphs] == [0, 1]
    assert paragraphs[0].sentences[0].text == "The Redis Queue feeds the PDF Parser."
    assert alternative.paragraphs.transcript.startswith("\nSpeaker 0: The Redis Queue")
    request = fake.requests[0]
    assert request.headers["authorization"] == f"Token {fake.api_key}"
    assert request.query == {
        "model": "nova-3",
        "smart_format": "true",
        "paragraphs": "true",
        "diarize": "true",
    }


def test_a_wrong_key_is_refused_with_401(fake: FakeDeepgram) -> None:
    error = listen(fake, wav(1.0), key="not-the-key")

    assert error.status_code == 401 and error.body["err_code"] == "INVALID_AUTH"
    assert fake.transcribed == 0


def test_a_streamed_chunked_body_is_read_whole(fake: FakeDeepgram) -> None:
    audio = wav(2.0, "Streamed in blocks.")

    async def blocks() -> AsyncIterator[bytes]:
        for start in range(0, len(audio), 4096):
            yield audio[start : start + 4096]

    response = listen(fake, blocks(), punctuate=True)

    assert response.results.channels[0].alternatives[0].transcript == "Streamed in blocks."
    assert fake.requests[0].chunked


def test_undecodable_audio_gets_deepgram_s_400(fake: FakeDeepgram) -> None:
    error = listen(fake, BROKEN_MP3)

    assert error.status_code == 400
    assert error.body["err_msg"] == "Bad Request: failed to process audio: corrupt or unsupported data"


def test_failures_on_demand_carry_retry_after(fake: FakeDeepgram) -> None:
    fake.fail_next(1, status=503, retry_after=1.5)

    error = listen(fake, wav(1.0))

    assert error.status_code == 503 and error.headers["retry-after"] == "1.5"
    assert listen(fake, wav(1.0)).metadata.duration == 1.0


def test_requests_over_the_cap_are_refused_and_latency_grows_with_duration() -> None:
    with FakeDeepgram(concurrency=2, latency_per_audio_s=0.3) as fake:

        async def three_at_once() -> list[Any]:
            loop = asyncio.get_running_loop()
            return await asyncio.gather(
                *(loop.run_in_executor(None, listen, fake, wav(3.0)) for _ in range(3))
            )

        started = time.monotonic()
        outcomes = asyncio.run(three_at_once())
        took = time.monotonic() - started

    refused = [o for o in outcomes if isinstance(o, ApiError)]
    assert len(refused) == 1 and refused[0].status_code == 429
    assert (fake.refused, fake.transcribed, fake.peak_in_flight) == (1, 2, 2)
    assert took >= 0.9  # 3 s of audio at 0.3 s per second of audio
    assert all(end - start >= 0.9 for start, end in fake.spans)
