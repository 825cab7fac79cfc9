"""Transcription phase: recordings (audio, and the audio track of video) to text with word timings.

An entry phase for .mp3 .wav .m4a .ogg .opus .flac .webm .mp4 (and whatever else Deepgram
reads: it recognises the format from the bytes). Per recording:

1. the file is probed on the thread pool (phases.audio): bytes that are not audio fail at once
   with one line and no call, and the duration sizes the timeout;
2. the transcript is looked up in the artifact store's cache, keyed by the audio's SHA-256, the
   endpoint and every option that shapes the answer: the same recording submitted again
   (``levers submit --force``, or under another name) makes no call, on any worker of any host
   that shares the store;
3. otherwise Deepgram transcribes it (phases.deepgram_api: the official SDK, the file streamed,
   the SDK's retries off), through the shared limit ``limit`` when pipeline.yaml declares it, which
   holds the provider's concurrency across every worker and host and retries 429 and 5xx answers
   honouring retry-after without spending the job's retries; the answer is cached.

Without DEEPGRAM_API_KEY a recording whose transcript is not cached fails with one line saying
what to set. DEEPGRAM_BASE_URL (or option ``base_url``) points the SDK at another endpoint.

Output, for chunking: extraction's fields (``format`` "audio", ``title``, ``text``, ``pages`` 1,
``page_offsets`` [0], ``headings`` [], ``chars``) plus ``duration_s``, ``model``, ``language``,
``request_id``, ``cached``, ``paragraphs`` (``start_s``, ``end_s``, ``offset`` in ``text``,
``speaker``) and ``words`` (``word`` as punctuated, ``start_s``, ``end_s``, ``confidence``,
``offset`` in ``text``, and ``speaker`` when diarized). Paragraphs are separated by blank lines,
and begin with "Speaker N: " when diarized, so chunking finds them; chunking turns word offsets
into each chunk's time span.

Options (``Options``): ``model`` (default nova-3), ``language`` (en), ``smart_format`` (true),
``diarize`` (false), ``base_url``, ``limit`` (deepgram; null for none), ``request_timeout`` (s,
default 60) plus ``timeout_per_audio_minute`` (s, default 15) for each minute of audio, ``max_bytes``
(default 2 GB, Deepgram's own limit).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from levers import Document, PhaseContext, PhaseOptions, SharedLimit, UnknownLimit
from phases.audio import Recording, probe
from phases.deepgram_api import Call, Untranscribable, base_url, request_transcript, require_api_key

SUFFIXES = (".mp3", ".wav", ".m4a", ".ogg", ".opus", ".flac", ".webm", ".mp4")
CACHE_NAMESPACE = "transcripts"
# Part of every cache key: change it when what is cached changes meaning.
CACHE_VERSION = 1
# Deepgram's own limit on a pre-recorded file.
MAX_BYTES = 2_000_000_000


# A day-long call, or a minute of audio taking an hour: far beyond any real transcription.
MAX_TIMEOUT_S = 24 * 3600.0


class Options(PhaseOptions):
    """transcription's options in pipeline.yaml."""

    model: Annotated[str, Field(min_length=1, description="Deepgram's model.")] = "nova-3"
    language: Annotated[str | None, Field(description="The spoken language; null to detect it.")] = "en"
    smart_format: Annotated[bool, Field(description="Deepgram's formatting of numbers, dates, ...")] = True
    diarize: Annotated[bool, Field(description='Speakers told apart ("Speaker N:" paragraphs).')] = False
    base_url: Annotated[
        str | None, Field(description="Deepgram's endpoint (else env DEEPGRAM_BASE_URL, else Deepgram's).")
    ] = None
    limit: Annotated[
        str | None,
        Field(description="The shared limit every call goes through when pipeline.yaml declares it."),
    ] = "deepgram"
    request_timeout: Annotated[
        float, Field(gt=0, le=MAX_TIMEOUT_S, description="Seconds a call may take, plus the per-minute part.")
    ] = 60.0
    timeout_per_audio_minute: Annotated[
        float, Field(ge=0, le=MAX_TIMEOUT_S, description="Seconds added to the timeout per minute of audio.")
    ] = 15.0
    max_bytes: Annotated[
        int, Field(ge=1, le=MAX_BYTES, description="Recordings larger than this fail without a call.")
    ] = MAX_BYTES

    def params(self) -> dict[str, Any]:
        """The query options of the request. Paragraphs are always asked for: they are the
        transcript's structure, what chunking splits on."""
        params: dict[str, Any] = {
            "model": self.model,
            "smart_format": self.smart_format,
            "punctuate": True,
            "paragraphs": True,
            "diarize": self.diarize,
        }
        if self.language:
            params["language"] = self.language
        return params

    def timeout_s(self, duration_s: float) -> float:
        return self.request_timeout + duration_s / 60 * self.timeout_per_audio_minute


def cache_key(audio_sha256: str, endpoint: str | None, params: dict[str, Any]) -> str:
    """The key of one transcript. The endpoint is part of it: a self-hosted or stand-in service
    may answer differently from Deepgram's own for the same audio and options."""
    identity = [CACHE_VERSION, audio_sha256, endpoint or "deepgram", sorted(params.items())]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def reuse_provider(options: Options) -> str:
    """The endpoint transcripts come from, for levers' reuse key (the environment may name it)."""
    return f"deepgram:{base_url(options.base_url) or 'deepgram'}"


async def transcribe(doc: Document, ctx: PhaseContext[Options]) -> dict[str, Any]:
    """Handler: transcribe one recording, from the cache when it was transcribed before."""
    settings = ctx.options
    if doc.size > settings.max_bytes:
        raise Untranscribable(f"recording is {doc.size} bytes, over max_bytes {settings.max_bytes}")
    endpoint = base_url(settings.base_url)
    recording: Recording = await ctx.run_in_thread(probe, doc.content)
    key = cache_key(recording.sha256, endpoint, settings.params())
    response = await ctx.run_in_thread(ctx.store.cached, CACHE_NAMESPACE, key) if ctx.store else None
    cached = response is not None
    if response is None:
        call = Call(
            doc.content, recording.size, settings.params(), settings.timeout_s(recording.duration_s), endpoint
        )
        limit = _declared_limit(ctx, settings.limit)
        response = await request_transcript(call, require_api_key(), limit, ctx.run_in_thread)
        if ctx.store is not None:
            await ctx.run_in_thread(ctx.store.put_cached, CACHE_NAMESPACE, key, response)
    output = transcript_output(response, Path(doc.name).stem, settings, recording)
    if not output["text"].strip():
        raise Untranscribable(f"no speech recognised in {output['duration_s']:.1f} s of audio")
    return {**output, "cached": cached}


def _declared_limit(ctx: PhaseContext, name: str | None) -> SharedLimit | None:
    """The shared limit ``name`` if pipeline.yaml declares it; None outside a levers job or without one."""
    if not name:
        return None
    try:
        return ctx.limit(name)
    except (UnknownLimit, RuntimeError):
        return None


def transcript_output(response: Any, title: str, settings: Options, recording: Recording) -> dict[str, Any]:
    """The phase's output from Deepgram's response (first channel, first alternative); pure."""
    results = response.get("results") if isinstance(response, dict) else None
    channels = (results or {}).get("channels") or [{}]
    channel = channels[0] if isinstance(channels[0], dict) else {}
    alternative = (channel.get("alternatives") or [{}])[0]
    words = [w for w in alternative.get("words") or [] if _timed(w)]
    text, paragraphs, placed = _layout(words, _paragraph_starts(alternative), settings.diarize)
    if not words:
        text = str(alternative.get("transcript") or "").strip()
    metadata = (response.get("metadata") if isinstance(response, dict) else None) or {}
    return {
        "format": "audio",
        "title": title,
        "text": text,
        "pages": 1,
        "page_offsets": [0],
        "headings": [],
        "chars": len(text),
        "duration_s": float(metadata.get("duration") or recording.duration_s),
        "model": _model_name(metadata) or settings.model,
        "language": channel.get("detected_language") or settings.language,
        "request_id": metadata.get("request_id"),
        "paragraphs": paragraphs,
        "words": placed,
    }


def _timed(word: Any) -> bool:
    return (
        isinstance(word, dict)
        and isinstance(word.get("start"), (int, float))
        and isinstance(word.get("end"), (int, float))
        and bool(word.get("punctuated_word") or word.get("word"))
    )


def _paragraph_starts(alternative: dict[str, Any]) -> list[tuple[float, int | None]]:
    """(start time, speaker) of each paragraph Deepgram found, in order; [] without paragraphs."""
    found = (alternative.get("paragraphs") or {}).get("paragraphs") or []
    starts = [
        (float(p["start"]), p.get("speaker"))
        for p in found
        if isinstance(p, dict) and isinstance(p.get("start"), (int, float))
    ]
    return sorted(starts, key=lambda item: item[0])


def _layout(
    words: list[dict[str, Any]], starts: list[tuple[float, int | None]], diarize: bool
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """The text (paragraphs of punctuated words, blank lines between), its paragraphs and its words,
    each with its offset in the text. A word belongs to the last paragraph starting at or before it."""
    boundaries = [start for start, _ in starts[1:]]
    groups: dict[int, list[dict[str, Any]]] = {}
    for word in words:
        groups.setdefault(bisect.bisect_right(boundaries, float(word["start"])), []).append(word)
    parts: list[str] = []
    paragraphs: list[dict[str, Any]] = []
    placed: list[dict[str, Any]] = []
    offset = 0
    for index in sorted(groups):
        group = groups[index]
        speaker = group[0].get("speaker", starts[index][1] if starts else None)
        prefix = f"Speaker {speaker}: " if diarize and speaker is not None else ""
        paragraphs.append({"start_s": group[0]["start"], "end_s": group[-1]["end"], "offset": offset,
                           "speaker": speaker if diarize else None})  # fmt: skip
        position = offset + len(prefix)
        tokens = []
        for word in group:
            token = str(word.get("punctuated_word") or word["word"])
            placed.append(_placed(word, token, position, diarize))
            tokens.append(token)
            position += len(token) + 1
        parts.append(prefix + " ".join(tokens))
        offset += len(parts[-1]) + 2
    return "\n\n".join(parts), paragraphs, placed


def _placed(word: dict[str, Any], token: str, offset: int, diarize: bool) -> dict[str, Any]:
    placed = {
        "word": token,
        "start_s": float(word["start"]),
        "end_s": float(word["end"]),
        "confidence": word.get("confidence"),
        "offset": offset,
    }
    if diarize and word.get("speaker") is not None:
        placed["speaker"] = word["speaker"]
    return placed


def _model_name(metadata: dict[str, Any]) -> str | None:
    info = metadata.get("model_info")
    names = [m.get("name") for m in info.values() if isinstance(m, dict)] if isinstance(info, dict) else []
    return next((str(name) for name in names if name), None)
