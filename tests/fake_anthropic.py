"""A local stand-in for the Anthropic Messages API, enough for the real ``anthropic`` SDK.

``POST /v1/messages`` answers a text block derived from the request ("Context for: <first words
of the last user message>"), or a ``tool_use`` block when the request has ``tools`` and
``tool_choice``. ``usage`` reports a cache write the first time a system block with
``cache_control`` is seen and a cache read when the same text comes again. The server records
every request, counts requests in flight (with the peak), waits ``latency_s`` before each answer,
and fails the next requests on demand (``fail_next``) with 429, 529 or any other status.

With ``rate`` (requests per ``window_s``) and ``concurrency``, it enforces the account's limits as
the real API does: the rate is a token bucket (``rate`` tokens, refilled continuously over
``window_s``; Anthropic documents its limits as one), and a request over either limit is answered
429 at once, with a retry-after (the time until a token is back, or one latency for a slot) and
the ``anthropic-ratelimit-requests-limit`` (per minute, as the API states it), ``-remaining`` and
``-reset`` (RFC 3339, when the bucket is full again) headers the API sends on every answer
(``rate_headers=False``: a provider that sends none).

    with FakeAnthropic(latency_s=0.1) as fake:
        client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="test")
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

# How many words of the last user message the text answer repeats.
ANSWER_WORDS = 8
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_DEFAULTS_BY_TYPE: dict[str, Any] = {"string": "", "integer": 0, "number": 0, "boolean": False, "null": None}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it; header names lower-cased."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float = 0.0  # time.monotonic() when the server received it
    refused: bool = False  # answered 429 by the enforced rate or concurrency


@dataclass(frozen=True)
class _Failure:
    status: int
    retry_after: float | None


class FakeAnthropic:
    """The server, on 127.0.0.1 and a free port, served by a background thread while open."""

    def __init__(
        self,
        latency_s: float = 0.0,
        *,
        rate: int | None = None,
        window_s: float = 60.0,
        concurrency: int | None = None,
        rate_headers: bool = True,
    ) -> None:
        self.latency_s = latency_s
        self.rate = rate
        self.window_s = window_s
        self.concurrency = concurrency
        self.rate_headers = rate_headers
        self._tokens = float(rate or 0)
        self._filled_at = time.monotonic()
        # requests being answered (not refused), with the peak
        self.serving = 0
        self.peak_serving = 0
        # canned tool inputs by tool name, used instead of the schema's minimal object
        self.tool_inputs: dict[str, dict[str, Any]] = {}
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._failures: deque[_Failure] = deque()
        self._cached: set[str] = set()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        # a short poll interval, so that closing the server does not wait half a second
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="fake-anthropic", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def fail_next(self, n: int, status: int = 429, retry_after: float | None = 0.2) -> None:
        """Answer the next ``n`` requests with ``status`` (and a retry-after header unless None)."""
        with self._lock:
            self._failures.extend(_Failure(status, retry_after) for _ in range(n))

    def answer(
        self, path: str, headers: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, dict[str, str], Any]:
        """Status, headers and JSON body for one request; called by the handler's threads."""
        with self._lock:
            arrived = time.monotonic()
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            failure = self._failures.popleft() if self._failures and path == "/v1/messages" else None
            enforced = self._enforce(arrived) if failure is None and path == "/v1/messages" else None
            self.requests.append(RecordedRequest(path, headers, body, arrived, refused=enforced is not None))
            number = len(self.requests)
            reply_headers = {"request-id": f"req_fake{number:06d}", **self._limit_headers()}
        serving = path == "/v1/messages" and failure is None and enforced is None
        try:
            if path != "/v1/messages":
                return 404, reply_headers, _error(404, f"no route {path}")
            failure = failure or enforced
            if failure is not None:
                # rate limits and overload are answered at once, as the real API does
                if failure.retry_after is not None:
                    reply_headers["retry-after"] = f"{failure.retry_after:.3f}".rstrip("0").rstrip(".")
                return failure.status, reply_headers, _error(failure.status, "fake failure on demand")
            time.sleep(self.latency_s)  # the simulated time the model takes
            return 200, reply_headers, self._message(body, number)
        finally:
            with self._lock:
                self.in_flight -= 1
                self.serving -= int(serving)

    def _enforce(self, now: float) -> _Failure | None:
        """Under the lock: a 429 when the request is over the rate or the concurrency, else None
        (and the request takes its token and slot)."""
        if self.rate is not None:
            refill = (now - self._filled_at) * self.rate / self.window_s
            self._tokens = min(float(self.rate), self._tokens + refill)
            self._filled_at = now
        if self.concurrency is not None and self.serving >= self.concurrency:
            return _Failure(429, max(self.latency_s, 0.001))
        if self.rate is not None and self._tokens < 1:
            return _Failure(429, (1 - self._tokens) * self.window_s / self.rate)
        if self.rate is not None:
            self._tokens -= 1
        self.serving += 1
        self.peak_serving = max(self.peak_serving, self.serving)
        return None

    def _limit_headers(self) -> dict[str, str]:
        """Under the lock: the rate-limit headers of an answer, when a rate is enforced."""
        if self.rate is None or not self.rate_headers:
            return {}
        full_in_s = (self.rate - self._tokens) * self.window_s / self.rate
        reset = datetime.fromtimestamp(time.time() + full_in_s, UTC).isoformat().replace("+00:00", "Z")
        return {
            "anthropic-ratelimit-requests-limit": str(round(self.rate * 60 / self.window_s)),
            "anthropic-ratelimit-requests-remaining": str(math.floor(self._tokens)),
            "anthropic-ratelimit-requests-reset": reset,
        }

    @property
    def refused(self) -> int:
        """Requests the enforced rate or concurrency refused."""
        with self._lock:
            return sum(1 for request in self.requests if request.refused)

    def _message(self, body: dict[str, Any], number: int) -> dict[str, Any]:
        content = _content(body, self.tool_inputs, number)
        return {
            "id": f"msg_fake{number:06d}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "claude-fake"),
            "content": content,
            "stop_reason": "tool_use" if content[0]["type"] == "tool_use" else "end_turn",
            "stop_sequence": None,
            "usage": self._usage(body, content),
        }

    def _usage(self, body: dict[str, Any], content: list[dict[str, Any]]) -> dict[str, int]:
        system = body.get("system") or []
        blocks = [{"type": "text", "text": system}] if isinstance(system, str) else system
        created = read = 0
        for block in blocks:
            if "cache_control" not in block:
                continue
            with self._lock:
                seen = block["text"] in self._cached
                self._cached.add(block["text"])
            if seen:
                read += _tokens(block["text"])
            else:
                created += _tokens(block["text"])
        total = _tokens(json.dumps(system)) + _tokens(json.dumps(body.get("messages", [])))
        return {
            "input_tokens": max(1, total - created - read),
            "output_tokens": _tokens(json.dumps(content)),
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # the default backlog of 5 drops connections when 30 calls arrive at once on a busy machine
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeAnthropic):
        super().__init__(address, handler)
        self.fake = fake


class _Handler(BaseHTTPRequestHandler):
    # keep-alive, as the SDK's connection pool expects; every answer has a Content-Length
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, reply_headers, answer = self.server.fake.answer(self.path.split("?")[0], headers, body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in reply_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests read the request log instead."""


def _content(
    body: dict[str, Any], tool_inputs: dict[str, dict[str, Any]], number: int
) -> list[dict[str, Any]]:
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if tools and choice and choice.get("type") != "none":
        # the tool that tool_choice names, else the first one
        tool = next((t for t in tools if t.get("name") == choice.get("name")), tools[0])
        arguments = tool_inputs.get(tool["name"]) or minimal_value(tool.get("input_schema", {}))
        return [
            {"type": "tool_use", "id": f"toolu_fake{number:06d}", "name": tool["name"], "input": arguments}
        ]
    words = _last_user_text(body.get("messages", [])).split()[:ANSWER_WORDS]
    return [{"type": "text", "text": "Context for: " + " ".join(words)}]


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content", "")
        if isinstance(content, str):
            return content
        return " ".join(block.get("text", "") for block in content if block.get("type") == "text")
    return ""


def minimal_value(schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """The simplest value valid for a JSON schema: required properties only, simple defaults by type.

    Follows local ``$ref``s (``#/$defs/...``, as pydantic writes them) and takes the first option of
    ``anyOf`` / ``oneOf`` / ``allOf`` that is not null.
    """
    root = schema if root is None else root
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return minimal_value(target, root)
    for word in ("default", "const"):
        if word in schema:
            return schema[word]
    if schema.get("enum"):
        return schema["enum"][0]
    for word in ("anyOf", "oneOf", "allOf"):
        if word in schema:
            options = [o for o in schema[word] if o.get("type") != "null"] or schema[word]
            return minimal_value(options[0], root)
    kind = schema.get("type", "object")
    kind = next((k for k in kind if k != "null"), "null") if isinstance(kind, list) else kind
    return _minimal_of_type(kind, schema, root)


def _minimal_of_type(kind: str, schema: dict[str, Any], root: dict[str, Any]) -> Any:
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: minimal_value(properties.get(name, {}), root) for name in schema.get("required", [])}
    if kind == "array":
        return [minimal_value(schema.get("items", {}), root) for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        return "x" * schema.get("minLength", 0)
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    return _DEFAULTS_BY_TYPE.get(kind)


def _error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def _tokens(text: str) -> int:
    # about four characters a token, as for English text
    return max(1, len(text) // 4)
