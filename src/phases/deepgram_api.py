"""One call to Deepgram's pre-recorded transcription (``POST /v1/listen``) through the official SDK.

The recording is streamed from its file in blocks with its size as Content-Length, so a large
file is never read whole into memory and the upload is not chunk-encoded. Each call has its own
timeout, which the caller scales with the recording's duration.

The SDK's own retries are off (``max_retries=0`` on the client and on the request). Under a
shared limit, levers retries 429 and 5xx answers honouring retry-after without failing the job;
a retry the SDK made on its own would be a request the limit never counted, holding a slot
silently. Without a limit, a failed call fails the attempt and the job's retries take over.

The SDK and httpx are imported when a call is made, not with the module: importing the SDK takes
over a second, which every worker of every phase would otherwise pay. With many transcription
workers, list ``phases.transcription_preload`` under ``preload:`` to pay it once, in the
supervisor, for all of them (see ``warm``).
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from levers import Permanent, SharedLimit

API_KEY_ENV = "DEEPGRAM_API_KEY"
BASE_URL_ENV = "DEEPGRAM_BASE_URL"
STREAM_BLOCK_BYTES = 1 << 20
MAX_ERROR_CHARS = 300

RunInThread = Callable[..., Awaitable[Any]]


class TranscriptionError(RuntimeError):
    """A recording could not be transcribed; the message is the one-line reason, never a traceback.
    Retried: the service may answer next time."""


class Untranscribable(Permanent, TranscriptionError):
    """A recording no retry can transcribe (not set up, refused by the service as it is): it fails
    at once."""


# Error statuses a later try may get past: a timeout, too many requests, the service's own errors.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})


def require_api_key() -> str:
    """The API key from the environment; a one-line TranscriptionError naming what to set."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise Untranscribable(
            f"{API_KEY_ENV} is not set: transcribing audio calls Deepgram (set {API_KEY_ENV} in the "
            f"workers' environment; {BASE_URL_ENV} points at another endpoint)"
        )
    return key


def base_url(option: str | None) -> str | None:
    """The endpoint: the phase option, else DEEPGRAM_BASE_URL, else None (the SDK's, Deepgram's own)."""
    url = (option or os.environ.get(BASE_URL_ENV, "")).strip().rstrip("/")
    if not url:
        return None
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise Untranscribable(f"the Deepgram base URL {shown(url)!r} is not an http(s) URL")
    return url


def shown(url: str) -> str:
    """A URL fit to print: without any user or password it carries."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()


@dataclass(frozen=True)
class Call:
    """One transcription request: the recording, its size, the query options, the timeout."""

    content: bytes | Path
    size: int
    params: dict[str, Any]
    timeout_s: float
    base_url: str | None


async def request_transcript(
    call: Call, api_key: str, limit: SharedLimit | None, run_in_thread: RunInThread
) -> Any:
    """Deepgram's response, as JSON; a TranscriptionError (one line) when it cannot be had."""
    import httpx
    from deepgram.core.api_error import ApiError

    client = _client(api_key, call.base_url)
    options: dict[str, Any] = {"max_retries": 0, "timeout": call.timeout_s}
    if isinstance(call.content, Path):
        options["additional_headers"] = {"Content-Length": str(call.size)}

    async def once() -> Any:
        body = call.content if isinstance(call.content, bytes) else _blocks(call.content, run_in_thread)
        try:
            return await client.listen.v1.media.transcribe_file(
                request=body, **call.params, request_options=options
            )
        finally:
            if not isinstance(body, bytes):
                await body.aclose()

    try:
        response = await (limit.call(once) if limit is not None else once())
    except ApiError as exc:
        status = getattr(exc, "status_code", None)
        transient = not isinstance(status, int) or status >= 500 or status in TRANSIENT_STATUSES
        error = TranscriptionError if transient else Untranscribable
        raise error(describe_api_error(exc, retried=limit is not None)) from None
    except httpx.TimeoutException:
        raise TranscriptionError(
            f"Deepgram did not answer within {call.timeout_s:.1f} s (the timeout grows with the "
            "recording's duration: raise the options request_timeout or timeout_per_audio_minute)"
        ) from None
    except httpx.HTTPError as exc:
        where = shown(call.base_url or "https://api.deepgram.com")
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TranscriptionError(
            f"could not reach Deepgram at {where}: {type(exc).__name__}: {first}"
        ) from None
    if not hasattr(response, "results"):
        raise TranscriptionError("Deepgram answered without results (a callback request?)")
    return response.model_dump(mode="json")


# One client per event loop, key and endpoint. A worker runs its jobs on one loop, so its jobs
# share one client and its kept-alive connection (no TLS handshake per recording). The loop owns
# the client's connections, hence one per loop; a closed loop's is dropped.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str | None], Any]] = (
    weakref.WeakKeyDictionary()
)


def _client(api_key: str, url: str | None) -> Any:
    made = _clients.setdefault(asyncio.get_running_loop(), {})
    if (api_key, url) not in made:
        import anyio

        made[api_key, url] = _new_client(api_key, url)
        # httpx's connection pool loads anyio's asyncio backend on its first request: loaded now
        # instead, before any slot is held (see warm)
        anyio.Event()
    return made[api_key, url]


def _new_client(api_key: str, url: str | None) -> Any:
    import httpx
    from deepgram import AsyncDeepgramClient

    http = httpx.AsyncClient(verify=_tls())
    client = AsyncDeepgramClient(api_key=api_key, httpx_client=http, max_retries=0, **_environment(url))
    _ = client.listen.v1.media  # the SDK imports its listen clients on first use: now, not in a call
    return client


@functools.cache
def _tls() -> ssl.SSLContext:
    """The TLS context every client of the process shares: loading the certificates costs some
    0.2 s of CPU, more than the rest of a job."""
    import httpx

    return httpx.create_ssl_context()


def warm() -> None:
    """Import and load what a first call needs (some 1.5 s of CPU): the SDK, its listen clients,
    anyio's asyncio backend, the TLS certificates. A worker does it before it takes a slot of the
    shared limit: one starved of CPU while it holds a slot can outlive its lease, and the slot is
    given to another call. ``preload: [phases.transcription_preload]`` does it once, in the
    supervisor, for every worker it forks."""
    import anyio

    _new_client("preload", None)

    async def backend() -> None:
        anyio.Event()

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop: the usual case, a supervisor importing its preloads
        asyncio.run(backend())


def _environment(url: str | None) -> dict[str, Any]:
    """The SDK's ``environment`` for a base URL; none (the SDK's production default) without one."""
    if url is None:
        return {}
    from deepgram import DeepgramClientEnvironment

    sockets = (
        "wss" + url.removeprefix("https") if url.startswith("https") else "ws" + url.removeprefix("http")
    )
    return {
        "environment": DeepgramClientEnvironment(base=url, production=sockets, agent=sockets, agent_rest=url)
    }


async def _blocks(path: Path, run_in_thread: RunInThread) -> AsyncIterator[bytes]:
    """The file's bytes in blocks, read on the phase's thread pool; opened again for every retry."""
    file = await run_in_thread(path.open, "rb")
    try:
        while block := await run_in_thread(file.read, STREAM_BLOCK_BYTES):
            yield block
    finally:
        file.close()


def describe_api_error(exc: Any, retried: bool) -> str:
    """One line for an error status: the status, Deepgram's code and message, and what to do."""
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        code = body.get("err_code") or body.get("category") or ""
        message = body.get("err_msg") or body.get("message") or body.get("details") or ""
    else:
        code, message = "", body or ""
    text = " ".join(str(message).split()) or "no message"
    if code and text.startswith(str(code)):
        code = ""  # "Bad Request: Bad Request: ..." says it twice
    hint = ""
    if status in (401, 403):
        hint = f" (check {API_KEY_ENV})"
    elif retried and (status == 429 or (isinstance(status, int) and status >= 500)):
        hint = " (still failing after retries)"
    return f"Deepgram error {status}{f' {code}' if code else ''}: {text}{hint}"[:MAX_ERROR_CHARS]
