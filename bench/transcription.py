"""Benchmark 5: transcription under a provider's concurrency cap, through the real supervisor.

The Deepgram stand-in (tests/fake_deepgram.py) holds at most CAP requests at once and refuses
the rest with 429, as Deepgram does; each request takes ``latency_s + duration x per_audio_s``.
The recordings (WAV files of 10 to 40 s) are submitted through levers' Submitter first, so that
the whole backlog waits before any worker starts; then the real ``levers up`` runs WORKERS
transcription workers, more than CAP, with the shared limit ``deepgram: {concurrency: CAP}``,
the real SDK streaming each recording, and the benchmark waits until all are done.

Reported from the stand-in's own log: requests refused (the target is none), answered, the peak
in flight, and how busy the CAP slots were while a backlog remained: the time requests held a
slot over CAP x the window, from the moment all CAP slots were first busy to the last request's
admission (after which fewer than CAP recordings remain, and slots must go idle). The same share
from the first request on includes the ramp while the workers start. Latencies are seconds, as
Deepgram's are for such recordings, so that the figure is about the limit rather than about the
CPU of a 2-core machine running 60 workers and the stand-in.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.common import PYTHON, Server, bench_env, md_table, stop_process, wait_until
from bench.projects import write_file
from levers.documents.ledger import DocStatus, Ledger
from levers.documents.submission import Submitter
from levers.pipeline.loading import load_pipeline
from tests.audio_files import write_wav
from tests.fake_deepgram import FakeDeepgram

PIPELINE = "transcription-bench"
CAP = 50
WORKERS = 60
DRAIN_TIMEOUT_S = 600.0
SECTION = "## 5. Transcription: recordings against a provider's concurrency cap"
PIPELINE_YAML = f"""\
name: {PIPELINE}
preload: [phases.transcription_preload]   # the SDK and TLS set up once, for all the workers
phases:
  transcription:
    handler: phases.transcription:transcribe
    accepts: [.wav]
    retries: 0
    levers: {{workers: {WORKERS}, semaphore: 1, threads: 1}}
limits:
  deepgram: {{concurrency: {CAP}}}
"""


@dataclass(frozen=True)
class Plan:
    recordings: int
    latency_s: float
    per_audio_s: float


FULL = Plan(recordings=200, latency_s=2.0, per_audio_s=0.2)
QUICK = Plan(recordings=100, latency_s=2.0, per_audio_s=0.2)


@dataclass(frozen=True)
class TranscriptionResult:
    plan: Plan
    audio_s: float
    answered: int
    refused: int
    failed: int
    peak: int
    full_after_s: float | None  # from the first request until all CAP slots were busy
    backlog_s: float  # from then (or the first request) until the last admission
    busy_backlog: float
    busy_from_first: float
    drain_s: float  # first request to last answer
    ideal_drain_s: float  # the requests' own latencies over CAP slots
    cpu_ms_per_recording: float  # the workers' CPU, their start-up included
    leases_expired: int  # slots whose holder's loop was stalled past the lease (levers up's log)


def duration_s(index: int) -> float:
    """10 to 40 s, spread evenly and deterministically."""
    return 10.0 + (index * 7) % 31


def run(server: Server, plan: Plan, progress: Callable[[str], None]) -> TranscriptionResult:
    with tempfile.TemporaryDirectory(prefix="levers-bench-audio-") as tmp:
        root = Path(tmp)
        write_file(root / "pipeline.yaml", PIPELINE_YAML)
        for index in range(plan.recordings):
            write_wav(root / "recordings" / f"r{index:03d}.wav", duration_s(index), f"Recording {index}.")
        ids = _submit(server, root, plan.recordings)
        progress(f"   {plan.recordings} recordings queued; {WORKERS} workers, cap {CAP}")
        latency = {"latency_s": plan.latency_s, "latency_per_audio_s": plan.per_audio_s}
        with FakeDeepgram(concurrency=CAP, **latency) as fake:
            supervisor = _supervise(server, root, fake)
            try:
                failed = _wait(server, ids)
                cpu_s = _workers_cpu_s(supervisor)
            finally:
                stop_process(supervisor, timeout_s=60)
            expired = (root / "levers-up.log").read_text(errors="replace").count("a lease expired unrenewed")
            return _result(plan, fake, failed, cpu_s, expired)


def _submit(server: Server, root: Path, recordings: int) -> list[str]:
    submitter = Submitter(load_pipeline(root / "pipeline.yaml"), server.connection)
    ids = [o.doc_id for o in submitter.submit_paths([str(root / "recordings")]) if o.doc_id]
    if len(ids) != recordings:
        raise RuntimeError(f"submitted {len(ids)} of {recordings} recordings")
    return ids


def _supervise(server: Server, root: Path, fake: FakeDeepgram) -> subprocess.Popen[bytes]:
    env = bench_env(REDIS_URL=server.url, DEEPGRAM_API_KEY=fake.api_key, DEEPGRAM_BASE_URL=fake.url)
    with (root / "levers-up.log").open("ab") as log:
        return subprocess.Popen(
            [PYTHON, "-m", "levers", "up", "-f", str(root / "pipeline.yaml")],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait(server: Server, ids: list[str]) -> int:
    """Wait until every recording is done or failed; how many failed."""
    ledger = Ledger(server.connection, PIPELINE)

    def statuses() -> list[str]:
        return [r.status if r is not None else "" for r in ledger.get_many(ids)]

    finished = (DocStatus.DONE, DocStatus.FAILED)
    wait_until(
        lambda: all(s in finished for s in statuses()), DRAIN_TIMEOUT_S, f"{len(ids)} recordings", 0.25
    )
    return sum(s == DocStatus.FAILED for s in statuses())


def _workers_cpu_s(supervisor: subprocess.Popen[bytes]) -> float:
    """CPU seconds (user + system) of the supervisor's worker processes so far."""
    total = 0.0
    for child in psutil.Process(supervisor.pid).children():
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


def _result(plan: Plan, fake: FakeDeepgram, failed: int, cpu_s: float, expired: int) -> TranscriptionResult:
    spans = sorted(fake.spans)
    first, last_admitted = spans[0][0], spans[-1][0]
    full = first_full(spans)
    audio = sum(duration_s(i) for i in range(plan.recordings))
    return TranscriptionResult(
        plan=plan,
        audio_s=audio,
        answered=fake.transcribed,
        refused=fake.refused,
        failed=failed,
        peak=fake.peak_in_flight,
        full_after_s=None if full is None else full - first,
        backlog_s=last_admitted - (first if full is None else full),
        busy_backlog=busy_share(spans, first if full is None else full, last_admitted),
        busy_from_first=busy_share(spans, first, last_admitted),
        drain_s=max(end for _, end in spans) - first,
        ideal_drain_s=(plan.recordings * plan.latency_s + audio * plan.per_audio_s) / CAP,
        cpu_ms_per_recording=cpu_s * 1000 / plan.recordings,
        leases_expired=expired,
    )


def first_full(spans: Sequence[tuple[float, float]]) -> float | None:
    """The first moment CAP requests were in flight together (an end at a start closes first)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    open_now = 0
    for at, change in events:
        open_now += change
        if open_now >= CAP:
            return at
    return None


def busy_share(spans: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Slot-seconds held in [start, end] over CAP slots for that long."""
    if end <= start:
        return float("nan")
    held = sum(max(0.0, min(e, end) - max(s, start)) for s, e in spans)
    return held / (CAP * (end - start))


def render(result: TranscriptionResult, run_line: str) -> str:
    plan = result.plan
    full = "never" if result.full_after_s is None else f"{result.full_after_s:.2f} s"
    rows = [
        ["recordings (10-40 s each)", f"{plan.recordings} ({result.audio_s / 60:.0f} min of audio)"],
        ["requests refused (429)", f"**{result.refused}**"],
        ["recordings answered / failed", f"{result.answered} / {result.failed}"],
        ["peak requests in flight", f"{result.peak} of {CAP}"],
        [
            "slots busy while a backlog remained",
            f"**{result.busy_backlog:.1%}** over {result.backlog_s:.1f} s",
        ],
        ["… from the first request (workers starting)", f"{result.busy_from_first:.1%}"],
        ["all slots busy after the first request", full],
        ["first request to last answer", f"{result.drain_s:.1f} s (ideal {result.ideal_drain_s:.1f} s)"],
        ["workers' CPU per recording (start-up included)", f"{result.cpu_ms_per_recording:.0f} ms"],
        ["leases that expired under a stalled worker", str(result.leases_expired)],
    ]
    met = result.refused == 0 and result.failed == 0 and result.busy_backlog >= 0.95
    return f"""{SECTION}

{run_line}

{plan.recordings} WAV recordings queued, then the transcription phase's {WORKERS} workers under the
real `levers up`, the shared limit `deepgram: {{concurrency: {CAP}}}`, and the real deepgram-sdk
streaming each file to the Deepgram stand-in (tests/fake_deepgram.py), which holds at most {CAP}
requests and refuses the rest with 429, answering after {plan.latency_s:g} s + {plan.per_audio_s:g} s
per second of audio. Figures from the stand-in's log. Target: 0 refused and at least 95 % of the
{CAP} slots busy while a backlog remains: **{"met" if met else "not met"}**.

{md_table(["", ""], rows, numeric=False)}

A freed slot goes to a worker already waiting with its recording: waiters look again every 50 ms
(plus up to 20 ms of jitter), so a hand-over idles a slot for some 35 ms of a request lasting
{plan.latency_s + 10 * plan.per_audio_s:g}-{plan.latency_s + 40 * plan.per_audio_s:g} s.
"""
