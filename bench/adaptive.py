"""A shared limit declared at three times what the provider allows: how fast it learns the real
figures, what share of requests the provider refuses meanwhile, and the throughput it keeps.

The provider is the local stand-in Anthropic API (tests/fake_anthropic.py) enforcing a real rate
(a token bucket of ``RATE`` requests per ``WINDOW_S``) and ``CONCURRENCY`` requests at once,
answering 429 with retry-after and Anthropic's rate-limit headers. Time is scaled down fifteenfold
from the real API's (a 4 s window for a minute, 0.1 s per answer). `levers run` on a phase of 3
workers x semaphore 8 sends every document's calls through ``ctx.limit("anthropic")``, the SDK's
own retries off. Variants, each on a flushed server, in one run:

- declared = real: pipeline.yaml holds the provider's exact figures (the baseline);
- declared 3x, learning from refusals: ``client.messages.create``, so the limit sees the headers
  of refused requests only;
- declared 3x, learning from every answer: ``client.messages.with_raw_response.create``, so the
  limit also sees the headers of every answer (requests remaining);
- declared 3x, no rate headers: the provider states nothing; the limit learns from refusals alone.

Figures per variant, at the stand-in: requests sent and refused (429), and throughput = answered
requests / span from the first request to the last answer, against the provider's real rate and
against the baseline. The variants take turns within each repetition (the machine's load drifts);
figures are the median of the repetitions, the effective figures' changes those of the last.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.common import (
    PYTHON,
    RunHeader,
    Server,
    bench_env,
    bench_parser,
    embedded_server,
    md_table,
    median,
    write_section,
)
from levers.limits.status import limits_status
from levers.pipeline.loading import load_pipeline
from levers.pipeline.outline import outline_of
from tests.fake_anthropic import FakeAnthropic

SECTION = "## 16. A limit declared too high learns the provider's real rate"
RATE = 32
WINDOW_S = 4.0
CONCURRENCY = 2
LATENCY_S = 0.1
DECLARED_FACTOR = 3
RUN_TIMEOUT_S = 900.0
# How often the limit's effective figures are sampled during a run.
SAMPLE_S = 0.25

HANDLER = """
import anthropic


async def ask(doc, ctx):
    client = anthropic.AsyncAnthropic(max_retries=0)  # the shared limit does the retrying
    limit = ctx.limit("anthropic")

    async def one(i):
        request = dict(model="claude-haiku-4-5", max_tokens=20,
                       messages=[{{"role": "user", "content": f"part {{i}} of {{doc.name}}"}}])
        if {raw}:
            return (await limit.call(client.messages.with_raw_response.create, **request)).parse()
        return await limit.call(client.messages.create, **request)

    await ctx.map(one, range({calls}))
    return {{"calls": {calls}}}
"""

PIPELINE = """
name: learning
limits:
  anthropic: {{requests_per_minute: {rate}, concurrency: {concurrency}, window_seconds: {window}}}
phases:
  ask:
    handler: asking:ask
    accepts: [.txt]
    retries: 0
    levers: {{workers: 3, semaphore: 8}}
"""


@dataclass(frozen=True)
class Variant:
    name: str
    factor: int
    raw: bool
    headers: bool


VARIANTS = (
    Variant("declared = real (baseline)", 1, raw=False, headers=True),
    Variant("declared 3x, learning from refusals", DECLARED_FACTOR, raw=False, headers=True),
    Variant("declared 3x, learning from every answer", DECLARED_FACTOR, raw=True, headers=True),
    Variant("declared 3x, provider sends no rate headers", DECLARED_FACTOR, raw=False, headers=False),
)


@dataclass
class Outcome:
    variant: Variant
    sent: int = 0
    refused: int = 0
    answered: int = 0
    span_s: float = 0.0
    # (seconds since the first request, effective rate, effective concurrency)
    samples: list[tuple[float, int | None, int | None]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.answered / self.span_s if self.span_s else 0.0


def main(argv: list[str]) -> int:
    parser = bench_parser(
        "adaptive",
        __doc__,
        {
            "--docs": (16, "documents per variant (20 calls each)"),
            "--reps": (3, "repetitions of each variant"),
        },
    )
    args = parser.parse_args(argv)
    header = RunHeader.start(["adaptive", *argv])
    with embedded_server() as server:
        runs = [[run_variant(server, variant, args.docs) for variant in VARIANTS] for _ in range(args.reps)]
    outcomes = [[rep[i] for rep in runs] for i in range(len(VARIANTS))]
    write_section(args.output, SECTION, render(outcomes, header.line()))
    return 0


def run_variant(server: Server, variant: Variant, docs: int, calls: int = 20) -> Outcome:
    server.connection.flushall()
    outcome = Outcome(variant)
    with tempfile.TemporaryDirectory(prefix="levers-bench-adaptive-") as tmp:
        project = Path(tmp)
        (project / "asking.py").write_text(HANDLER.format(raw=variant.raw, calls=calls))
        declared = PIPELINE.format(
            rate=RATE * variant.factor, concurrency=CONCURRENCY * variant.factor, window=WINDOW_S
        )
        (project / "pipeline.yaml").write_text(declared)
        for i in range(docs):
            (project / f"doc{i}.txt").write_text(f"document {i}")
        stand_in = FakeAnthropic(
            LATENCY_S, rate=RATE, window_s=WINDOW_S, concurrency=CONCURRENCY, rate_headers=variant.headers
        )
        with stand_in:
            env = bench_env(REDIS_URL=server.url, ANTHROPIC_BASE_URL=stand_in.url, ANTHROPIC_API_KEY="bench")
            done = threading.Event()
            sampler = threading.Thread(target=_sample, args=(server.url, project, stand_in, outcome, done))
            sampler.start()
            try:
                result = subprocess.run(
                    [PYTHON, "-m", "levers", "run", "*.txt"], cwd=project, env=env,
                    capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
                )  # fmt: skip
            finally:
                done.set()
                sampler.join()
        if result.returncode != 0:
            raise RuntimeError(f"levers run failed: {result.stderr[-2000:]}")
    sent = [r for r in stand_in.requests if r.path == "/v1/messages"]
    answered = [r.at for r in sent if not r.refused]
    outcome.sent, outcome.refused, outcome.answered = len(sent), len(sent) - len(answered), len(answered)
    outcome.span_s = max(answered) - min(r.at for r in sent)
    sys.stderr.write(
        f"adaptive: {variant.name}: {outcome.refused} of {outcome.sent} refused, "
        f"{outcome.throughput:.2f} answers/s, {outcome.throughput / (RATE / WINDOW_S):.0%} of the real rate\n"
    )
    return outcome


def _sample(
    url: str, project: Path, stand_in: FakeAnthropic, outcome: Outcome, done: threading.Event
) -> None:
    """The limit's effective figures every SAMPLE_S, timed from the first request at the stand-in."""
    spec = load_pipeline(project / "pipeline.yaml").spec
    with redis.Redis.from_url(url) as connection:
        while not done.wait(SAMPLE_S):
            if not stand_in.requests:
                continue
            figures = limits_status(connection, outline_of(spec), "anthropic")
            since = time.monotonic() - stand_in.requests[0].at
            outcome.samples.append(
                (since, figures["effective_requests_per_minute"], figures["effective_concurrency"])
            )


def _changes(samples: list[tuple[float, int | None, int | None]], index: int) -> str:
    """The sampled effective figure as it changed: ``6 -> 4 (0.3 s) -> 2 (0.8 s)``."""
    shown: list[str] = []
    last = None
    for since, *figures in samples:
        value = figures[index]
        if value != last:
            shown.append(f"{value}" if last is None else f"{value} ({since:.1f} s)")
            last = value
    return " -> ".join(shown) or "-"


def render(outcomes: list[list[Outcome]], run_line: str) -> str:
    baselines = outcomes[0]
    header = [
        "variant", "sent", "refused", "refused share", "answers/s", "of real rate", "of baseline",
        f"effective rate per {WINDOW_S:g} s (since the first request)", "effective concurrency",
    ]  # fmt: skip
    return "\n".join(
        [
            SECTION,
            "",
            run_line,
            "",
            f"The stand-in allows {RATE} requests per {WINDOW_S:g} s ({RATE / WINDOW_S:g}/s) and "
            f"{CONCURRENCY} at once, {LATENCY_S:g} s per answer; pipeline.yaml declares "
            f"{DECLARED_FACTOR}x both (the baseline: exactly them). `levers run`, 3 workers x semaphore 8, "
            f"{baselines[0].answered} calls per variant, {len(baselines)} repetitions.",
            "",
            md_table(header, [_row(runs, baselines) for runs in outcomes]),
            "",
        ]
    )


def _row(runs: list[Outcome], baselines: list[Outcome]) -> list[str]:
    """Medians over a variant's repetitions; against the baseline, the median of the ratios to the
    baseline run of the same repetition."""
    against = [o.throughput / b.throughput for o, b in zip(runs, baselines, strict=True)]
    return [
        runs[0].variant.name,
        f"{median([o.sent for o in runs]):.0f}",
        f"{median([o.refused for o in runs]):.0f}",
        f"{median([o.refused / o.sent for o in runs]):.1%}",
        f"{median([o.throughput for o in runs]):.2f}",
        f"{median([o.throughput / (RATE / WINDOW_S) for o in runs]):.0%}",
        f"{median(against):.0%}",
        _changes(runs[-1].samples, 0),
        _changes(runs[-1].samples, 1),
    ]
