"""The fake Anthropic server, driven by the real ``anthropic`` SDK."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from pydantic import BaseModel

from tests.fake_anthropic import FakeAnthropic

MODEL = "claude-fake-1"


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


def client(fake: FakeAnthropic, max_retries: int = 2) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=fake.url, api_key="test", max_retries=max_retries)


async def ask(sdk: anthropic.AsyncAnthropic, text: str, **extra: Any) -> anthropic.types.Message:
    return await sdk.messages.create(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": text}], **extra
    )


def test_the_sdk_gets_a_message_with_cache_usage(fake: FakeAnthropic) -> None:
    system = [
        {"type": "text", "text": "A long shared document. " * 40, "cache_control": {"type": "ephemeral"}}
    ]

    async def twice() -> list[anthropic.types.Message]:
        sdk = client(fake)
        return [await ask(sdk, "where is the invoice total", system=system) for _ in range(2)]

    first, second = asyncio.run(twice())

    assert first.content[0].type == "text"
    assert first.content[0].text == "Context for: where is the invoice total"
    assert first.model == MODEL and first.stop_reason == "end_turn"
    assert first.usage.cache_creation_input_tokens > 0 and first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == 0
    assert "anthropic-version" in fake.requests[0].headers
    assert fake.requests[0].body["system"] == system


def test_the_sdk_retries_a_429_honouring_retry_after(fake: FakeAnthropic) -> None:
    fake.fail_next(1, status=429, retry_after=0.3)
    started = time.monotonic()

    message = asyncio.run(ask(client(fake), "hello there"))

    assert message.content[0].text == "Context for: hello there"
    assert [r.headers["x-stainless-retry-count"] for r in fake.requests] == ["0", "1"]
    assert time.monotonic() - started >= 0.3


def test_a_529_reaches_the_caller_as_overloaded(fake: FakeAnthropic) -> None:
    fake.fail_next(1, status=529, retry_after=None)

    with pytest.raises(anthropic.InternalServerError) as raised:
        asyncio.run(ask(client(fake, max_retries=0), "hello"))

    assert raised.value.status_code == 529
    assert "retry-after" not in raised.value.response.headers


def test_peak_in_flight_counts_concurrent_requests(fake: FakeAnthropic) -> None:
    fake.latency_s = 0.3

    async def five() -> None:
        sdk = client(fake)
        await asyncio.gather(*(ask(sdk, f"question {i}") for i in range(5)))

    asyncio.run(five())

    assert fake.peak_in_flight == 5
    assert fake.in_flight == 0


class Entity(BaseModel):
    name: str
    kind: str | None


class Extraction(BaseModel):
    entity: Entity
    others: list[Entity]
    confidence: float


def test_a_forced_tool_gets_a_minimal_valid_input(fake: FakeAnthropic) -> None:
    tool = {"name": "extract", "description": "x", "input_schema": Extraction.model_json_schema()}

    message = asyncio.run(
        ask(client(fake), "hi", tools=[tool], tool_choice={"type": "tool", "name": "extract"})
    )

    block = message.content[0]
    assert block.type == "tool_use" and block.name == "extract"
    assert message.stop_reason == "tool_use"
    # a nullable property gets its first non-null type's default
    expected = Extraction(entity=Entity(name="", kind=""), others=[], confidence=0)
    assert Extraction.model_validate(block.input) == expected


def test_a_canned_tool_input_replaces_the_minimal_one(fake: FakeAnthropic) -> None:
    canned = {"entity": {"name": "ACME", "kind": "org"}, "others": [], "confidence": 0.9}
    fake.tool_inputs["extract"] = canned
    tool = {"name": "extract", "input_schema": Extraction.model_json_schema()}

    message = asyncio.run(ask(client(fake), "hi", tools=[tool], tool_choice={"type": "any"}))

    assert message.content[0].input == canned
