"""The ``anthropic`` context provider: the real SDK against the fake Messages API on 127.0.0.1.

Documents are built so that every paragraph is one chunk (12 tokens each, budget 16), which
makes the number of API calls exact.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from levers.limits.shared import JobLimits
from levers.limits.status import limits_status
from levers.pipeline.model import LimitSettings, Phase, Pipeline
from levers.pipeline.outline import outline_of
from levers.worker.jobs import one_line
from levers.worker.phase_context import Document, Levers, PhaseContext
from phases.chunking import Options, chunk
from phases.contexts import CACHE_DIR, DEFAULT_MODEL, DOCUMENT_PROMPT, ContextError
from tests.fake_anthropic import ANSWER_WORDS, FakeAnthropic

LATENCY_S = 0.05
PIPELINE = "contexts-test"
USAGE_KEYS = {
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "calls",
}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAnthropic]:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    with FakeAnthropic(latency_s=LATENCY_S) as server:
        yield server


def extracted(chunks: int, topic: str = "queue") -> dict[str, Any]:
    paragraphs = (
        f"Paragraph {n} explains how the {topic} absorbs burst number {n} today." for n in range(chunks)
    )
    return {"title": "Operations guide", "text": "\n\n".join(paragraphs)}


def spec(**limits: dict[str, Any]) -> Pipeline:
    return Pipeline(
        name=PIPELINE,
        phases={"chunking": Phase(handler="phases.chunking:chunk", accepts=["*"])},
        limits={name: LimitSettings(**values) for name, values in limits.items()},
    )


def run(
    fake: FakeAnthropic | None,
    doc: dict[str, Any],
    state_dir: Path,
    *,
    semaphore: int = 5,
    limits: tuple[Pipeline, str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The chunking handler on ``doc``, as a job would run it; ``limits`` is (spec, redis url)."""
    options = {"chunk_tokens": 16, "overlap_tokens": 0, **options}
    if fake is not None:
        options.setdefault("anthropic_base_url", fake.url)

    async def job() -> dict[str, Any]:
        # made inside the loop, as jobs.py does: its Redis client belongs to this loop
        job_limits = JobLimits(*limits) if limits else None
        ctx = PhaseContext(
            "chunking", Levers(1, semaphore, 0), Options(**options), state_dir, None, job_limits
        )
        try:
            return await chunk(Document("doc-1", "guide.md", b"", input=doc), ctx)
        finally:
            if job_limits is not None:
                await job_limits.aclose()

    return asyncio.run(job())


def fake_tokens(text: str) -> int:
    """The fake's token rule: four characters a token."""
    return max(1, len(text) // 4)


def test_peak_concurrency_equals_the_semaphore_lever(fake: FakeAnthropic, tmp_path: Path) -> None:
    out = run(fake, extracted(20), tmp_path, semaphore=5)

    assert len(out["chunks"]) == 20 and len(fake.requests) == 20
    assert fake.peak_in_flight == 5
    assert (out["provider"], out["model"], out["cached"]) == ("anthropic", DEFAULT_MODEL, 0)
    assert all(item["context"].startswith("Context for: ") for item in out["chunks"])


def test_every_request_sends_the_whole_document_as_a_cached_system_block(
    fake: FakeAnthropic, tmp_path: Path
) -> None:
    doc = extracted(8)
    out = run(fake, doc, tmp_path)

    block = {
        "type": "text",
        "text": DOCUMENT_PROMPT.format(document=doc["text"]),
        "cache_control": {"type": "ephemeral"},
    }
    assert all(request.body["system"] == [block] for request in fake.requests)
    asked = [request.body["messages"][0]["content"] for request in fake.requests]
    for item in out["chunks"]:
        assert sum(f"<chunk>\n{item['text']}\n</chunk>" in content for content in asked) == 1
    assert all(content.startswith("Here is the chunk we want to situate") for content in asked)
    assert all(
        content.endswith("Answer only with the succinct context and nothing else.") for content in asked
    )
    assert {(r.body["model"], r.body["max_tokens"]) for r in fake.requests} == {(DEFAULT_MODEL, 150)}
    # the first call wrote the cache alone; all the others read it
    written = fake_tokens(block["text"])
    usage = out["usage"]
    assert usage["cache_creation_input_tokens"] == written
    assert usage["cache_read_input_tokens"] == written * (len(fake.requests) - 1)


def test_usage_is_summed_over_the_calls(fake: FakeAnthropic, tmp_path: Path) -> None:
    out = run(fake, extracted(6), tmp_path, model="claude-fake-1", max_tokens=90)

    # what the fake reported, recomputed from what it received (its token rule, its answer)
    inputs = outputs = 0
    for request in fake.requests:
        body = request.body
        total = fake_tokens(json.dumps(body["system"])) + fake_tokens(json.dumps(body["messages"]))
        inputs += max(1, total - fake_tokens(body["system"][0]["text"]))
        words = body["messages"][0]["content"].split()[:ANSWER_WORDS]
        outputs += fake_tokens(json.dumps([{"type": "text", "text": "Context for: " + " ".join(words)}]))
    written = fake_tokens(fake.requests[0].body["system"][0]["text"])
    assert out["usage"] == {
        "input_tokens": inputs,
        "output_tokens": outputs,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": written * 5,
        "calls": 6,
    }
    assert out["model"] == "claude-fake-1"
    assert {r.body["max_tokens"] for r in fake.requests} == {90}


@pytest.mark.parametrize(("status", "rate_limited"), [(429, 2), (529, 2), (500, 0), (503, 0)])
def test_rate_limits_and_server_errors_are_retried_by_the_shared_limit_honouring_retry_after(
    fake: FakeAnthropic, tmp_path: Path, redis_url: str, status: int, rate_limited: int
) -> None:
    pipeline = spec(anthropic={"concurrency": 3})
    fake.fail_next(2, status=status, retry_after=0.2)
    started = time.monotonic()

    out = run(fake, extracted(10), tmp_path, semaphore=5, limits=(pipeline, redis_url))

    assert time.monotonic() - started >= 0.4  # the warm-up call waited twice
    assert len(fake.requests) == 12 and out["usage"]["calls"] == 10
    assert all(item["context"].startswith("Context for: ") for item in out["chunks"])
    # the SDK never retried on its own: every retry was the limit's, and counted by it
    assert {request.headers["x-stainless-retry-count"] for request in fake.requests} == {"0"}
    with redis.Redis.from_url(redis_url) as connection:
        totals = limits_status(connection, outline_of(pipeline), "anthropic")
    assert (totals["calls"], totals["rate_limited"], totals["in_flight"]) == (12, rate_limited, 0)
    assert fake.peak_in_flight <= 3


def test_without_a_declared_limit_the_sdk_retries(
    fake: FakeAnthropic, tmp_path: Path, redis_url: str
) -> None:
    fake.fail_next(1, status=429, retry_after=0.2)

    out = run(fake, extracted(4), tmp_path, limits=(spec(), redis_url))

    assert len(fake.requests) == 5 and out["usage"]["calls"] == 4
    assert [request.headers["x-stainless-retry-count"] for request in fake.requests[:2]] == ["0", "1"]


def test_a_second_run_makes_no_api_calls(fake: FakeAnthropic, tmp_path: Path) -> None:
    doc = extracted(7)
    first = run(fake, doc, tmp_path)
    again = run(fake, doc, tmp_path)

    assert len(fake.requests) == 7
    assert again["chunks"] == first["chunks"]
    assert again["cached"] == 7 and again["usage"] == dict.fromkeys(USAGE_KEYS, 0)
    files = sorted((tmp_path / CACHE_DIR).glob("*/*.json"))
    assert len(files) == 7 and all(path.parent.name == path.name[:2] for path in files)
    assert not list((tmp_path / CACHE_DIR).glob("*/.*"))  # no temporary files left behind

    # another model is another key; so is another document holding the same chunk
    run(fake, doc, tmp_path, model="claude-other")
    assert len(fake.requests) == 14


def test_an_unreadable_cache_entry_is_a_miss(fake: FakeAnthropic, tmp_path: Path) -> None:
    doc = extracted(3)
    run(fake, doc, tmp_path)
    broken = sorted((tmp_path / CACHE_DIR).glob("*/*.json"))[0]
    broken.write_text("{not json")

    out = run(fake, doc, tmp_path)

    assert (len(fake.requests), out["cached"], out["usage"]["calls"]) == (4, 2, 1)
    assert json.loads(broken.read_text())["context"].startswith("Context for: ")


class FailsOneRequest(FakeAnthropic):
    """Answers request number ``number`` (in arrival order, counted under a lock) with a 400."""

    def __init__(self, number: int) -> None:
        super().__init__(latency_s=LATENCY_S)
        self.number = number
        self.arrived = 0
        self._count = threading.Lock()

    def answer(
        self, path: str, headers: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, dict[str, str], Any]:
        with self._count:
            self.arrived += 1
            failing = self.arrived == self.number
        if failing:
            return (
                400,
                {},
                {"type": "error", "error": {"type": "invalid_request_error", "message": "bad chunk"}},
            )
        return super().answer(path, headers, body)


def test_a_failed_document_keeps_the_contexts_already_paid_for(fake: FakeAnthropic, tmp_path: Path) -> None:
    doc = extracted(6)
    with FailsOneRequest(number=3) as failing, pytest.raises(ContextError, match=r"400 .*: bad chunk"):
        # the warm-up call, then two at once: one fails at once, the other is answered after it
        run(failing, doc, tmp_path, semaphore=2)
    # the calls not started when the failure came were never sent
    assert failing.arrived == 3

    out = run(fake, doc, tmp_path)

    assert (out["cached"], out["usage"]["calls"], len(fake.requests)) == (2, 4, 4)


def test_auto_picks_local_without_a_key(
    fake: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")

    out = run(fake, extracted(3), tmp_path)

    assert (out["provider"], out["model"], out["cached"]) == ("local", None, 0)
    assert out["usage"] == dict.fromkeys(USAGE_KEYS, 0)
    assert out["chunks"][0]["context"] == "From 'Operations guide', part 1 of 3."
    assert fake.requests == []


def test_auto_picks_anthropic_with_a_key_and_the_base_url_from_the_environment(
    fake: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)

    out = run(None, extracted(2), tmp_path)

    assert out["provider"] == "anthropic" and len(fake.requests) == 2
    # the key from the environment, in whichever header this SDK version uses
    sent = {r.headers.get("x-api-key") or r.headers.get("authorization") for r in fake.requests}
    assert sent in ({"test-key"}, {"Bearer test-key"})


def test_explicit_anthropic_without_a_key_fails_with_one_clear_line(
    fake: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")

    with pytest.raises(ContextError) as raised:
        run(fake, extracted(2), tmp_path, context_provider="anthropic")

    assert one_line(raised.value) == (
        "ContextError: context_provider 'anthropic' needs ANTHROPIC_API_KEY in the workers' environment "
        "(or use context_provider: local)"
    )
    assert fake.requests == []


@pytest.mark.parametrize(("status", "limited"), [(400, False), (500, False), (400, True)])
def test_an_api_error_fails_the_document_with_one_line(
    fake: FakeAnthropic, tmp_path: Path, request: pytest.FixtureRequest, status: int, limited: bool
) -> None:
    limits = (spec(anthropic={"concurrency": 2}), request.getfixturevalue("redis_url")) if limited else None
    fake.fail_next(1, status=status, retry_after=None)

    with pytest.raises(ContextError) as raised:
        # max_retries applies without a limit; under one the SDK never retries
        run(fake, extracted(5), tmp_path, limits=limits, max_retries=0)

    message = str(raised.value)
    kind = {400: "invalid_request_error", 500: "api_error"}[status]
    assert message == f"Anthropic API error {status} {kind} on context for chunk 0: fake failure on demand"
    assert "\n" not in message and one_line(raised.value) == f"ContextError: {message}"
    # the warm-up call failed, so the other chunks were never sent
    assert len(fake.requests) == 1
    # raised after the calls settled, so no SDK traceback is chained to it
    assert raised.value.__cause__ is None and raised.value.__context__ is None
