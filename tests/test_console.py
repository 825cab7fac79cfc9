"""What levers shows a person: phase outputs in a few words."""

from __future__ import annotations

from levers.console import _describe


def test_outputs_are_described_by_size_and_figures() -> None:
    output = {
        "provider": "anthropic",
        "chunks": [{}, {}, {}],
        "text": "x" * 500,
        "usage": {"input_tokens": 2480, "cache_read_input_tokens": 6460, "calls": 20, "output_tokens": 0},
    }
    assert _describe(output) == (
        "provider: anthropic; chunks: 3; text: 500 chars; "
        "usage: input_tokens 2480, cache_read_input_tokens 6460, calls 20"
    )
