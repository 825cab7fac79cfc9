"""A local stand-in for Deepgram's pre-recorded API (``POST /v1/listen``), enough for the real SDK.

It checks ``Authorization: Token <key>``, reads the body (sized or chunked), and answers the
real response's shape: ``metadata`` (request_id, sha256, created, duration, channels, models,
model_info) and ``results.channels[0].alternatives[0]`` with ``transcript``, ``confidence``,
``words`` (word, start, end, confidence, punctuated_word, and speaker when ``diarize=true``) and
``paragraphs`` (transcript, and paragraphs of sentences with start/end, num_words, speaker).

What it "hears": a WAV's ``LIST/INFO/ICMT`` comment when there is one (tests write the script
they want heard there), else sentences about the recording, as many as its duration holds. Words
are spread evenly over the duration. A body that no decoder can read is refused with Deepgram's
400 ("failed to process audio: corrupt or unsupported data").

Like the real service, it holds at most ``concurrency`` requests at once and refuses the rest
with 429 (counted in ``refused``); a request takes ``latency_s + duration x latency_per_audio_s``
to answer; ``fail_next`` fails the next requests with any status. It records every request,
the peak in flight and, per answered request, the span it held a slot (``spans``). A request
stops counting as in flight before its answer is sent, so a client that sends its next request
after reading an answer never finds its own last one still counted.

    with FakeDeepgram(concurrency=50, latency_s=0.2) as fake:
        client = AsyncDeepgramClient(api_key=fake.api_key, environment=environment(fake.url))

``python -m tests.fake_deepgram --port 8765`` serves it until Ctrl-C, for trying levers by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import re
import signal
import struct
import threading
import time
import uuid
import wave
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import mutagen

# Spoken words per second of audio when the recording carries no script: a typical speaking rate.
WORDS_PER_S = 2.5
SENTENCES_PER_PARAGRAPH = 3
ERRORS = {
    400: ("Bad Request", "Bad Request: failed to process audio: corrupt or unsupported data"),
    401: ("INVALID_AUTH", "Invalid credentials."),
    404: ("NOT_FOUND", "Not found."),
    429: ("TOO_MANY_REQUESTS", "Too many requests. Please try again later"),
    500: ("INTERNAL_SERVER_ERROR", "Internal server error"),
    502: ("BAD_GATEWAY", "Bad gateway"),
    503: ("SERVICE_UNAVAILABLE", "Service unavailable"),
}
_SENTENCE_END = re.compile(r"[.!?]$")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received: path, query (first value of each key), lower-cased headers."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    chunked: bool
    at: float  # time.monotonic() when its headers arrived
    client_port: int  # the connection it came on: the same port again is a kept-alive connection


@dataclass(frozen=True)
class _Failure:
    status: int
    retry_after: float | None


class FakeDeepgram:
    """The server on 127.0.0.1 (a free port unless ``port``), served by a background thread while open."""

    def __init__(
        self,
        api_key: str = "test-deepgram-key",
        concurrency: int = 50,
        latency_s: float = 0.0,
        latency_per_audio_s: float = 0.0,
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.concurrency = concurrency
        self.latency_s = latency_s
        self.latency_per_audio_s = latency_per_audio_s
        self.requests: list[RecordedRequest] = []
        self.spans: list[tuple[float, float]] = []  # (admitted, answered) of each admitted request
        self.refused = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._failures: deque[_Failure] = deque()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", port), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="fake-deepgram", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def transcribed(self) -> int:
        """Requests answered with a transcript."""
        return len(self.spans)

    def __enter__(self) -> FakeDeepgram:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def fail_next(self, n: int, status: int = 503, retry_after: float | None = None) -> None:
        """Answer the next ``n`` admitted requests with ``status`` (and a retry-after header unless None)."""
        with self._lock:
            self._failures.extend(_Failure(status, retry_after) for _ in range(n))

    def admit(self, request: RecordedRequest) -> tuple[bool, _Failure | None]:
        """Record the request; whether it gets a slot, and the failure it is to get, if any."""
        with self._lock:
            self.requests.append(request)
            if self.in_flight >= self.concurrency:
                self.refused += 1
                return False, None
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return True, self._failures.popleft() if self._failures else None

    def leave(self, admitted_at: float, answered: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            if answered:
                self.spans.append((admitted_at, time.monotonic()))

    def transcribe(self, body: bytes, query: dict[str, str]) -> dict[str, Any] | None:
        """The response for ``body``, or None when it is not audio the service could decode."""
        heard = hear(body)
        if heard is None:
            return None
        duration, script = heard
        time.sleep(self.latency_s + duration * self.latency_per_audio_s)  # the simulated processing
        return response(body, duration, script, query)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # the default backlog of 5 drops connections when dozens of workers call at once
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeDeepgram):
        super().__init__(address, handler)
        self.fake = fake


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        fake = self.server.fake
        split = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(split.query).items()}
        headers = {name.lower(): value for name, value in self.headers.items()}
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        started = time.monotonic()
        if split.path != "/v1/listen":
            self._read_body(chunked)
            return self._error(404)
        if headers.get("authorization") != f"Token {fake.api_key}":
            self._read_body(chunked)
            return self._error(401)
        admitted, failure = fake.admit(
            RecordedRequest(split.path, query, headers, chunked, started, self.client_address[1])
        )
        answer = None
        try:
            body = self._read_body(chunked)
            if admitted and failure is None:
                answer = fake.transcribe(body, query)
        finally:
            if admitted:
                fake.leave(started, answered=answer is not None)
        if not admitted:
            self._error(429)
        elif failure is not None:
            self._error(failure.status, failure.retry_after)
        elif answer is None:
            self._error(400)
        else:
            self._send(200, answer)

    def _read_body(self, chunked: bool) -> bytes:
        if not chunked:
            return self.rfile.read(int(self.headers.get("content-length") or 0))
        parts = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers, up to the blank line
            pass
        return b"".join(parts)

    def _error(self, status: int, retry_after: float | None = None) -> None:
        code, message = ERRORS.get(status, ("ERROR", f"status {status}"))
        extra = {"retry-after": str(retry_after)} if retry_after is not None else {}
        self._send(status, {"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())}, extra)

    def _send(self, status: int, answer: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("dg-request-id", str(answer.get("request_id") or answer["metadata"]["request_id"]))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests read the request log instead."""


def hear(body: bytes) -> tuple[float, str | None] | None:
    """(duration, the script a WAV carries or None) of a body a decoder can read; None otherwise."""
    if body[:4] == b"RIFF":
        try:
            with wave.open(io.BytesIO(body)) as audio:
                duration = audio.getnframes() / audio.getframerate()
        except (wave.Error, EOFError, ZeroDivisionError):
            return None
        return duration, wav_comment(body)
    try:
        parsed = mutagen.File(io.BytesIO(body))
    except Exception:  # any decoder error: the service's "corrupt or unsupported data"
        return None
    length = getattr(getattr(parsed, "info", None), "length", None)
    return (float(length), None) if length else None


def wav_comment(body: bytes) -> str | None:
    """The text of a WAV's LIST/INFO/ICMT chunk, if it has one."""
    position = 12
    while position + 8 <= len(body):
        kind, size = body[position : position + 4], struct.unpack("<I", body[position + 4 : position + 8])[0]
        if kind == b"LIST" and body[position + 8 : position + 12] == b"INFO":
            inner, end = position + 12, position + 8 + size
            while inner + 8 <= end:
                sub, sub_size = body[inner : inner + 4], struct.unpack("<I", body[inner + 4 : inner + 8])[0]
                if sub == b"ICMT":
                    return body[inner + 8 : inner + 8 + sub_size].rstrip(b"\0").decode("utf-8", "replace")
                inner += 8 + sub_size + (sub_size & 1)
        position += 8 + size + (size & 1)
    return None


def with_script(wav: bytes, script: str) -> bytes:
    """``wav`` with ``script`` in a LIST/INFO/ICMT chunk: what the stand-in will hear in it."""
    text = script.encode() + b"\0"
    text += b"\0" * (len(text) & 1)
    info = b"INFO" + b"ICMT" + struct.pack("<I", len(text)) + text
    body = wav + b"LIST" + struct.pack("<I", len(info)) + info
    return body[:4] + struct.pack("<I", len(body) - 8) + body[8:]


def default_script(duration: float) -> str:
    sentences = max(1, round(duration * WORDS_PER_S / 8))
    return " ".join(f"Part {n + 1} of this recording covers queues and workers." for n in range(sentences))


def response(body: bytes, duration: float, script: str | None, query: dict[str, str]) -> dict[str, Any]:
    """Deepgram's response shape for one channel and one alternative."""
    diarize = query.get("diarize") == "true"
    punctuated = query.get("punctuate") == "true" or query.get("smart_format") == "true"
    tokens = (script or default_script(duration)).split()
    words = _words(tokens, duration, diarize)
    alternative: dict[str, Any] = {
        "transcript": " ".join(w["punctuated_word"] if punctuated else w["word"] for w in words),
        "confidence": 0.98,
        "words": words if punctuated else [_unpunctuated(w) for w in words],
    }
    if query.get("paragraphs") == "true":
        alternative["paragraphs"] = _paragraphs(words, diarize)
    model = query.get("model", "base")
    model_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, model))
    metadata = {
        "transaction_key": "deprecated",
        "request_id": str(uuid.uuid4()),
        "sha256": hashlib.sha256(body).hexdigest(),
        "created": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "duration": round(duration, 5),
        "channels": 1,
        "models": [model_id],
        "model_info": {model_id: {"name": model, "version": "2025-01-01.0", "arch": "fake"}},
    }
    channel: dict[str, Any] = {"alternatives": [alternative]}
    if query.get("language"):
        channel["detected_language"] = query["language"]
    return {"metadata": metadata, "results": {"channels": [channel]}}


def _unpunctuated(word: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in word.items() if key != "punctuated_word"}


def _words(tokens: list[str], duration: float, diarize: bool) -> list[dict[str, Any]]:
    slot = max(duration - 0.2, 0.01) / max(len(tokens), 1)
    words = []
    paragraph = sentence = 0
    for index, token in enumerate(tokens):
        start = 0.1 + index * slot
        word: dict[str, Any] = {
            "word": re.sub(r"[^\w'-]", "", token).lower() or token.lower(),
            "start": round(start, 3),
            "end": round(start + slot * 0.8, 3),
            "confidence": 0.97,
            "punctuated_word": token,
        }
        if diarize:
            word["speaker"] = paragraph % 2
            word["speaker_confidence"] = 0.9
        words.append(word)
        if _SENTENCE_END.search(token):
            sentence += 1
            if sentence % SENTENCES_PER_PARAGRAPH == 0:
                paragraph += 1
    return words


def _paragraphs(words: list[dict[str, Any]], diarize: bool) -> dict[str, Any]:
    paragraphs: list[dict[str, Any]] = []
    sentences: list[list[dict[str, Any]]] = [[]]
    for index, word in enumerate(words):
        sentences[-1].append(word)
        last = index == len(words) - 1
        if _SENTENCE_END.search(word["punctuated_word"]) or last:
            if len(sentences) == SENTENCES_PER_PARAGRAPH or last:
                paragraphs.append(_paragraph(sentences, diarize, len(paragraphs)))
                sentences = [[]]
            else:
                sentences.append([])
    transcript = "".join(
        "\n" + (f"Speaker {p['speaker']}: " if diarize else "") + " ".join(s["text"] for s in p["sentences"])
        for p in paragraphs
    )
    return {"transcript": transcript, "paragraphs": paragraphs}


def _paragraph(sentences: list[list[dict[str, Any]]], diarize: bool, number: int) -> dict[str, Any]:
    spoken = [s for s in sentences if s]
    paragraph: dict[str, Any] = {
        "sentences": [
            {"text": " ".join(w["punctuated_word"] for w in s), "start": s[0]["start"], "end": s[-1]["end"]}
            for s in spoken
        ],
        "num_words": sum(len(s) for s in spoken),
        "start": spoken[0][0]["start"],
        "end": spoken[-1][-1]["end"],
    }
    if diarize:
        paragraph["speaker"] = number % 2
    return paragraph


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the Deepgram stand-in until Ctrl-C.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--key", default="test-deepgram-key", help="the API key it accepts")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.3, help="seconds per request")
    parser.add_argument("--latency-per-audio-second", type=float, default=0.02)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    latency = (args.latency, args.latency_per_audio_second)
    with FakeDeepgram(args.key, args.concurrency, *latency, port=args.port) as fake:
        print(f"Deepgram stand-in on {fake.url} (DEEPGRAM_BASE_URL={fake.url}); Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
        print(f"answered {fake.transcribed}, refused {fake.refused}, peak in flight {fake.peak_in_flight}")


if __name__ == "__main__":
    main()
