"""Plan against what the pipeline does: `levers plan --check` during a fresh run of the bundled
pipeline (offline) over 3,000 small documents, and the what-if of doubling the workers of a
CPU-bound phase against what the pipeline then does, on one private server.

1. The bundled pipeline under `levers up`; once a third of the documents went through its last
   phase and at least ``CHECK_AFTER_S`` passed (a whole minute of measurements, past the start
   while the phases' queues fill: 1,000 documents drain in 45 s on a quiet 2-core machine),
   `levers plan --check --json` gives, per phase, the plan's documents/s and the measured
   ones over the same window. ``--record DIR`` saves the metrics buckets and the supervisors'
   reports at that moment (the replay test's data, tests/data/plan/).
2. A phase burning 0.2 s of CPU per job with 4 workers: `levers plan --set burn.workers=8` is asked
   after a minute and a half, then `levers set burn.workers=8`; the rate the pipeline then does
   (documents finished over 60 s, after the new workers settled) is compared with the prediction.

``bin/bench planning [--docs N] [--record DIR] [--output FILE]`` writes its own section of
RESULTS.md, replacing the one a previous run wrote, and leaves the other sections as they are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rq import Worker

from bench.common import (
    PYTHON,
    ROOT,
    RunHeader,
    Server,
    bench_env,
    bench_parser,
    embedded_server,
    levers_cli,
    md_table,
    stop_process,
    write_section,
)
from bench.killstorm import write_documents
from levers import keys
from levers.metrics import BUCKET_S
from levers.pipeline.loading import load_pipeline
from levers.planning.measured import WINDOW_MIN

SECTION = "## 15. Plan against what the pipeline does"
TARGET_ERROR = 0.15
PIPELINE = "levers"
LAST_PHASE = "kg_ingest"
CHECK_AT_SHARE = 1 / 3  # of the documents through the last phase
CHECK_AFTER_S = 75.0  # from submitting them, at the earliest
BURN_S = 0.2
BURN_WORKERS = (4, 8)
WHATIF_AFTER_S = 90.0
SETTLE_S = 20.0
MEASURE_S = 60.0
TIMEOUT_S = 3600.0

BURN_MODULE = f'''"""A phase that burns {BURN_S} s of CPU per job."""

import time


def burn(doc, ctx):
    until = time.process_time() + {BURN_S}
    while time.process_time() < until:
        pass
    return {{"burnt": {BURN_S}}}
'''
BURN_PIPELINE = f"""name: burning
phases:
  burn:
    handler: burning:burn
    accepts: ["*"]
    levers: {{workers: {BURN_WORKERS[0]}, semaphore: 1}}
"""


@dataclass
class CheckRun:
    documents: int
    seconds_in: float  # from submitting to the check
    rows: list[dict[str, Any]]
    window: dict[str, Any]
    hosts: list[dict[str, Any]]


@dataclass
class WhatIfRun:
    before_measured: float
    before_planned: float
    after_planned: float
    after_measured: float
    note: str


def wait(done: Callable[[], bool], timeout_s: float, what: str, supervisor: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        if supervisor.poll() is not None:
            raise RuntimeError(f"levers up exited ({supervisor.returncode}) while waiting for {what}")
        time.sleep(0.2)


def done_count(connection: redis.Redis, pipeline: str, phase: str) -> int:
    return int(connection.hget(keys.phase_counter(pipeline, phase), "done") or 0)


def finished(connection: redis.Redis, phases: list[str]) -> int:
    """Documents through the last phase, or failed in any."""
    failed = sum(int(connection.hget(keys.phase_counter(PIPELINE, p), "failed") or 0) for p in phases)
    return done_count(connection, PIPELINE, LAST_PHASE) + failed


def record(connection: redis.Redis, pipeline: str, phases: list[str], now: float, target: Path) -> None:
    """The metrics buckets of the window (and the minute before it) and the supervisors' reports."""
    current = int(now // BUCKET_S)
    buckets: dict[str, dict[str, dict[str, str]]] = {}
    for phase in phases:
        for minute in range(current - WINDOW_MIN, current + 1):
            raw = connection.hgetall(keys.phase_metrics(pipeline, phase, minute))
            if raw:
                buckets.setdefault(phase, {})[str(minute)] = {_text(k): _text(v) for k, v in raw.items()}
    reports = [_text(raw) for raw in connection.hvals(keys.supervisors(pipeline))]
    target.mkdir(parents=True, exist_ok=True)
    data = {"pipeline": pipeline, "now": now, "buckets": buckets, "reports": reports}
    (target / "bundled-run.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def check_run(server: Server, root: Path, count: int, record_to: Path | None) -> CheckRun:
    project = root / "bundled"
    project.mkdir()
    shutil.copy(ROOT / "pipeline.yaml", project / "pipeline.yaml")
    write_documents(root / "docs", count)
    env = bench_env(REDIS_URL=server.url)
    for offline in ("ANTHROPIC_API_KEY", "FALKORDB_URL"):
        env.pop(offline, None)
    with (project / "up.log").open("wb") as log:
        supervisor = subprocess.Popen(
            [PYTHON, "-m", "levers", "up"], cwd=project, env=env, stdout=log, stderr=log
        )
    try:
        workers = sum(p.levers.workers for p in load_pipeline(project / "pipeline.yaml").spec.phases.values())
        wait(lambda: len(Worker.all(connection=server.connection)) >= workers, 300, "the workers", supervisor)
        started = time.time()
        levers_cli(["submit", str(root / "docs")], project, env)
        wait(lambda: done_count(server.connection, PIPELINE, LAST_PHASE) >= count * CHECK_AT_SHARE, TIMEOUT_S,
             "a third of the documents", supervisor)  # fmt: skip
        time.sleep(max(0.0, started + CHECK_AFTER_S - time.time()))
        at = time.time()
        data = json.loads(levers_cli(["plan", "--check", "--json"], project, env))
        if record_to is not None:
            record(server.connection, PIPELINE, list(data["window"]["jobs"]), at, record_to)
            shutil.copy(project / "pipeline.yaml", record_to / "pipeline.yaml")
        wait(lambda: finished(server.connection, list(data["window"]["jobs"])) >= count, TIMEOUT_S,
             "every document", supervisor)  # fmt: skip
    finally:
        stop_process(supervisor, timeout_s=120)
        levers_cli(["down"], project, env)  # the graph phase's embedded FalkorDB
    return CheckRun(count, at - started, data["check"], data["window"], data["hosts"])


def rate_over(connection: redis.Redis, seconds: float) -> float:
    first, began = done_count(connection, "burning", "burn"), time.monotonic()
    time.sleep(seconds)
    return (done_count(connection, "burning", "burn") - first) / (time.monotonic() - began)


def path_rate(plan: dict[str, Any]) -> float:
    """The pace of a plan's one path, from `levers plan --json`'s "plan" or "base"."""
    return float(plan["paths"][0]["docs_per_second"])


def whatif_run(server: Server, root: Path) -> WhatIfRun:
    project = root / "burning"
    (project / "docs").mkdir(parents=True)
    (project / "burning.py").write_text(BURN_MODULE)
    (project / "pipeline.yaml").write_text(BURN_PIPELINE)
    for i in range(2500):  # more than 2 cores get through in the time this part takes
        (project / "docs" / f"d{i:04d}.txt").write_text(f"document {i}\n")
    server.connection.flushall()
    env = bench_env(REDIS_URL=server.url)
    with (project / "up.log").open("wb") as log:
        supervisor = subprocess.Popen(
            [PYTHON, "-m", "levers", "up"], cwd=project, env=env, stdout=log, stderr=log
        )
    try:
        wait(lambda: len(Worker.all(connection=server.connection)) >= BURN_WORKERS[0], 300, "the workers",
             supervisor)  # fmt: skip
        levers_cli(["submit", "docs"], project, env)
        time.sleep(WHATIF_AFTER_S - MEASURE_S)
        before_measured = rate_over(server.connection, MEASURE_S)
        asked = json.loads(
            levers_cli(["plan", "--set", f"burn.workers={BURN_WORKERS[1]}", "--json"], project, env)
        )
        levers_cli(["set", f"burn.workers={BURN_WORKERS[1]}"], project, env)
        wait(lambda: len(Worker.all(connection=server.connection)) >= BURN_WORKERS[1], 300, "the new workers",
             supervisor)  # fmt: skip
        time.sleep(SETTLE_S)
        after_measured = rate_over(server.connection, MEASURE_S)
        further = levers_cli(["plan", "--set", f"burn.workers={BURN_WORKERS[1] * 2}"], project, env)
        notes = [line for line in further.splitlines() if "more workers" in line]
    finally:
        stop_process(supervisor, timeout_s=120)
    return WhatIfRun(before_measured, path_rate(asked["base"]), path_rate(asked["plan"]), after_measured,
                     notes[0].strip() if notes else "")  # fmt: skip


def render(checked: CheckRun, whatif: WhatIfRun, run_line: str) -> str:
    rows = [[r["phase"], _rate(r["predicted"]), _rate(r["measured"]), _error(r["error"]),
             "yes" if r["loaded"] else "no"] for r in checked.rows]  # fmt: skip
    hosts = "; ".join(f"{h['name']} {h['cores']:g} cores" for h in checked.hosts)
    error = (whatif.after_planned - whatif.after_measured) / whatif.after_measured
    return "\n".join([
        SECTION, "",
        run_line, "",
        f"Hosts as plan saw them: {hosts}. Target: plan within {TARGET_ERROR:.0%} of the measured rate, "
        "per phase.", "",
        f"**Bundled pipeline (offline), {checked.documents:,} documents.** `levers plan --check` "
        f"{checked.seconds_in:.0f} s after submitting them, once a third had gone through {LAST_PHASE} "
        f"and at least {CHECK_AFTER_S:.0f} s had passed; "
        f"window: the last {checked.window['minutes']} min, weighted (half-life "
        f"{checked.window['half_life_min']:g} min).", "",
        md_table(["phase", "plan docs/s", "measured docs/s", "error", "kept busy"], rows), "",
        f"**What if: {BURN_WORKERS[0]} -> {BURN_WORKERS[1]} workers of a phase burning {BURN_S} s of CPU "
        f"per job.** `levers plan --set burn.workers={BURN_WORKERS[1]}` after {WHATIF_AFTER_S:.0f} s, "
        f"then `levers set`; measured: documents done over {MEASURE_S:.0f} s, before and (after "
        f"{SETTLE_S:.0f} s to settle) after.", "",
        md_table(["", "plan docs/s", "measured docs/s"], [
            [f"{BURN_WORKERS[0]} workers", _rate(whatif.before_planned), _rate(whatif.before_measured)],
            [f"{BURN_WORKERS[1]} workers", _rate(whatif.after_planned), _rate(whatif.after_measured)],
        ]), "",
        f"Error of the what-if: {_error(error)} (without the cores, workers / job s would have said "
        f"{_rate(whatif.before_planned * BURN_WORKERS[1] / BURN_WORKERS[0])})."
        + (f" Plan on a further doubling: \"{whatif.note}\"" if whatif.note else ""), "",
    ])  # fmt: skip


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def main(argv: list[str]) -> int:
    parser = bench_parser("planning", __doc__, {"--docs": (3000, "documents in the bundled run")})
    parser.add_argument("--record", type=Path, default=None, help="save the check's metrics buckets here")
    args = parser.parse_args(argv)
    header = RunHeader.start(["planning", *argv])
    with tempfile.TemporaryDirectory(prefix="levers-bench-plan-") as tmp, embedded_server() as server:
        checked = check_run(server, Path(tmp), args.docs, args.record)
        whatif = whatif_run(server, Path(tmp))
    write_section(args.output, SECTION, render(checked, whatif, header.line()))
    return 0
