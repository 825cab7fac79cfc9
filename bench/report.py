"""bench/RESULTS.md from the three benchmarks' results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import ROOT, git_state, md_table, median, spread
from bench.efficiency import CALL_S, CALLS, Cell, EfficiencyResult
from bench.memory import SetupResult, src_freezes, src_preload
from bench.overhead import LABELS, OverheadResult

TARGET_FORK_RATIO = 3.0
TARGET_SIMPLE_RATIO = 0.90
TARGET_EFFICIENCY = 0.95
TARGET_USS_MB = 60.0


@dataclass(frozen=True)
class RunInfo:
    command: str
    started: str  # ISO date and time
    seconds: float
    machine: dict[str, str]
    load_after: str
    quick: bool
    src_changed: bool = False  # src/ changed while the benchmarks ran


def src_fingerprint() -> str:
    """A hash of every file under src/, to notice an edit made while the benchmarks ran."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "src").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of the per-repetition ratios: each pair ran in the same repetition, minutes apart."""
    return median([n / d for n, d in zip(numerators, denominators, strict=True)])


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def overhead_ratios(result: OverheadResult) -> dict[str, float]:
    v = result.variants
    out = {}
    if "levers" in v and "fork" in v:
        out["levers/fork"] = _ratio(v["levers"].rates, v["fork"].rates)
    for name in ("levers", "levers-bare"):
        if name in v and "simple" in v:
            out[f"{name}/simple"] = _ratio(v[name].rates, v["simple"].rates)
    return out


def _overhead_targets(result: OverheadResult) -> list[list[str]]:
    r = overhead_ratios(result)
    rows = []
    if "levers/fork" in r:
        ok = r["levers/fork"] >= TARGET_FORK_RATIO
        rows.append(["levers job path ≥ 3× rq.Worker (forking)", f"{r['levers/fork']:.2f}×", _met(ok)])
    checks = [
        ("levers/simple", "levers job path within 10 % of rq.SimpleWorker"),
        ("levers-bare/simple", "bare LeversWorker (plain jobs) within 10 % of rq.SimpleWorker"),
    ]
    for key, label in checks:
        if key in r:
            rows.append([label, f"{r[key]:.0%} of its rate", _met(r[key] >= TARGET_SIMPLE_RATIO)])
    return rows


def _efficiency_targets(result: EfficiencyResult) -> list[list[str]]:
    cells = result.cells
    if not cells:
        return []
    meeting = sum(c.efficiency >= TARGET_EFFICIENCY for c in cells)
    worst = min(cells, key=lambda c: c.efficiency)
    best = max(cells, key=lambda c: c.efficiency)
    low = f"{worst.efficiency:.1%} (w={worst.workers}, s={worst.semaphore})"
    high = f"{best.efficiency:.1%} (w={best.workers}, s={best.semaphore})"
    measured = f"{meeting} of {len(cells)} cells; {low} to {high}"
    rows = [["lever efficiency ≥ 95 % of ideal", measured, _met(meeting == len(cells))]]
    batch = sum(c.batch_efficiency >= TARGET_EFFICIENCY for c in cells)
    lowest = min(c.batch_efficiency for c in cells)
    rows.append(
        ["(reference) … the same over the whole batch", f"{batch} of {len(cells)} cells; lowest {lowest:.1%}",
         _met(batch == len(cells))]
    )  # fmt: skip
    peer = next((c for c in cells if c.workers == 3 and c.semaphore == 10), None)
    if peer is not None:
        label = "… 3 workers × semaphore 10 (Celery, Dramatiq: 94-95 %)"
        rows.append([label, f"{peer.efficiency:.1%}", _met(peer.efficiency >= TARGET_EFFICIENCY)])
    return rows


def _memory_targets(results: list[SetupResult]) -> list[list[str]]:
    rows = []
    for setup in results:
        if setup.name.startswith("levers"):
            worst = _worst_worker_uss(setup)
            label = f"USS per levers worker < 60 MB: {setup.description}"
            rows.append([label, f"{worst:.1f} MB (largest worker, any moment)", _met(worst < TARGET_USS_MB)])
    return rows


def _worst_worker_uss(setup: SetupResult) -> float:
    """The largest USS of any worker at any of the three moments (idle, after gc, after a kg job)."""
    values = []
    for w in setup.workers():
        values += [s.uss for s in (w.idle, w.after_gc, w.after_kg_job) if s is not None]
    return max(values)


OVERHEAD_TEXT = """\
## 1. Per-job overhead (no-op jobs, one worker, burst mode)

{jobs:,} no-op jobs per run, drained by one worker process in burst mode (`work(burst=True)`, INFO
logging to a file, RQ's JSON serializer, no scheduler); {reps} repetitions, the variants taking turns
within each repetition (rotating order), each run on a freshly flushed database of the same server.
Ratios are medians of per-repetition ratios (the two runs of a pair are seconds apart), so the
machine's load largely cancels out of them; the min-max column shows how much it moved the rates.
CPU columns: the worker process's user + system time (with its work horses for the forking Worker)
and the server's, per job; they are less sensitive to other people's load than wall time, though
not immune on a 2-vCPU VM.

{table}

The levers job path is a one-phase pipeline's `levers.worker.jobs.run_phase` jobs in a temporary directory
(`def noop(doc, ctx): return {{}}`, defaults otherwise), its documents submitted through
`levers.documents.submission.Submitter`, run by `levers.worker.process.run_worker` itself with only
`LeversWorker.work`
wrapped (burst mode, no scheduler, timed). LeversWorker runs such a job in its own steps (take,
handler, settle: levers/worker/rq_worker.py), settling each job and taking the next on a helper
thread while the following handler runs.

### Round trips and commands per job (exact, not timed)

The difference between a 120-job and a 20-job run, so the worker's start and end do not count.
Round trips are the packets the worker process sends (a pipeline or a transaction is one);
commands are what the server executed (`INFO commandstats`). On loopback a round trip is mostly two
context switches and the client's parsing, which is what a no-op job consists of.

{trips}
"""

PROFILE_TEXT = """\
### Profile of the levers job path (cProfile)

{jobs:,} jobs each for the bare LeversWorker (plain jobs) and the levers job path under cProfile
({bare_rate:.0f} and {levers_rate:.0f} jobs/s under the profiler, whose overhead inflates every row:
read them as shares). cProfile sees one thread, so these runs do each job's steps one after
another on the worker's main thread (`LeversWorker.overlap = False`): the rows are the work per
job, not what lies on the path between two handlers. Cumulative milliseconds per job; the .prof
files are in bench/profiles/ (`python -m pstats bench/profiles/levers.prof`).

{breakdown}

Top functions of the levers job path by own time:

{own}
"""

EFFICIENCY_TEXT = """\
## 2. Lever efficiency (real supervisor, simulated calls)

Each document makes {calls} calls of {call_ms:.0f} ms (`asyncio.sleep`) through `ctx.gather`; ideal =
workers / (ceil({calls} / semaphore) × {call_ms:.0f} ms). The real `levers up` supervises the workers
(forked after preloading); the benchmark waits until all of them listen, then for each semaphore
value rewrites pipeline.yaml (running workers read the lever at each job start) and submits the
cell's documents through the Submitter. Rate = the sum of each worker's own rate: its documents
over the span from its first job's start to its last job's end (RQ's job times), so worker
start-up is outside, and so is the few milliseconds' stagger with which the submitter's first
documents reach the workers (they start that far apart and, each doing its share, end that far
apart). *… over the whole batch*: documents / (last document finished − first job started), both
from levers' ledger, stagger and the first take and last hand-off included. Median of {reps}
repetition(s), about {window:g} s of ideal work per cell (at least {min_docs} documents).

*Handler-alone ceiling*: ideal ÷ the time of the same handler with a PhaseContext on one event
loop, document after document, no worker and no Redis; `asyncio.sleep` overshoots a little every
round (the loop waits in whole milliseconds), so no worker can beat it. *Overhead ms/doc* =
workers ÷ measured rate − handler-alone time, split into *handler slower* (the handler's own time
inside the worker, from the ledger, beyond handler-alone: a fresh event loop per job, the other
threads and processes competing for the CPU) and *around the handler* (everything else on the
worker's path from one handler to the next: dequeue, RQ's and levers' bookkeeping, whatever of it
is not overlapped). *Workers' CPU*: user + system time of the supervisor's descendants per
document; *machine busy*: the share of both cores busy during the cell, whoever used them (the
server, the submitter, other people's jobs). The handler-alone time is a median of a few runs: a
small negative *handler slower* is within its noise.

{table}
{rq_cells}
Peers on a similar workload (from the issue, for context): Celery and Dramatiq 94-95 %, RQ
SimpleWorker 87 %, RQ forking Worker 69 % (3 workers, semaphore 10).
"""

RQ_CELLS_TEXT = """
The same workload as plain RQ jobs on this machine, for reference: `bench.jobs.calls` (the same
20 sleeps behind an `asyncio.Semaphore`, in `asyncio.run` per job) run by plain
`rq worker -w rq.SimpleWorker` processes, started first; the cell's jobs are enqueued at once and
both rates are taken from RQ's own started_at / ended_at, the same way. *Handler slower* is RQ's started_at to
ended_at beyond the handler alone; workers' CPU is the rq worker processes'.

{table}
"""

MEMORY_TEXT = """\
## 3. Memory per idle worker (MB = MiB)

psutil `memory_full_info()`: USS is what only that process holds (what one more worker costs); PSS
splits shared pages among their sharers (PSS adds up to the machine's total); RSS counts shared
pages in full. One worker per phase (extraction, chunking, kg_ingest), measured idle one second
after every worker listens; *after gc*: after a job that runs `gc.collect()` in each worker (a full
collection writes to every tracked object's header, so the pages a forked worker shared with its
supervisor become its own: any worker that has run jobs gets there); *kg_ingest after its first
job*: after a job that imports `phases.graph_store` (graphiti) and collects, which is what
kg_ingest's first real job does, since it imports graph_store lazily.

Every setup imports phases.extraction, phases.chunking and phases.kg_ingest (levers through
preload_handlers, plain RQ in the module of its `-w` worker class); *graph_store preloaded* adds
phases.graph_store. This src {preload}; its preload_handlers {freeze}. The setups follow:
`levers up` itself, except the one that turns gc.freeze() off, run by bench/supervise.py (`levers
up` in a process where `gc.freeze` is a no-op).

{table}

levers' workers run `work(with_scheduler=True)`, so each phase's queue also gets an RQ scheduler
process forked from one of its workers: the scheduler column, included in the total.
"""

HEADER_TEXT = """\
# levers benchmarks: results

Generated by `{command}` on {started}, in {minutes:.1f} min{quick}. Benchmarks, not tests: figures
from a shared, noisy 2-core machine; compare ratios within this file, as absolute rates move with
the machine's load. What each benchmark measures and how to read it: bench/README.md.

## Machine

{machine}

## Targets

{targets}
"""


def _overhead_section(result: OverheadResult) -> str:
    v = result.variants
    simple, fork = v.get("simple"), v.get("fork")
    rows = []
    for name, variant in v.items():
        rate = variant.median_rate
        rows.append(
            [
                LABELS[name],
                f"{rate:,.0f}",
                spread(variant.rates),
                f"{1000 / rate:.2f}",
                f"{_ratio(variant.rates, fork.rates):.2f}×" if fork else "-",
                f"{_ratio(variant.rates, simple.rates):.0%}" if simple else "-",
                f"{median(variant.worker_cpu_ms):.2f}",
                f"{median(variant.server_cpu_ms):.2f}",
                f"{median(variant.commands_per_job):.0f}",
            ]
        )
    header = ["worker", "median jobs/s", "min-max", "ms/job", "× forking", "vs SimpleWorker",
              "worker CPU ms/job", "server CPU ms/job", "commands/job"]  # fmt: skip
    trips = md_table(
        ["worker / job path", "round trips/job", "commands/job"],
        [[r["label"], f"{r['round_trips']:.0f}", f"{r['commands']:.0f}"] for r in result.round_trips],
    )
    text = OVERHEAD_TEXT.format(
        jobs=result.jobs, reps=result.repetitions, table=md_table(header, rows), trips=trips
    )
    if result.profile:
        text += "\n" + _profile_section(result.profile)
    return text


def _profile_section(profile: dict[str, Any]) -> str:
    bare = {b["label"]: b for b in profile["levers-bare"]["breakdown"]}
    rows = []
    for row in profile["levers"]["breakdown"]:
        label = row["label"]
        indent = len(label) - len(label.lstrip())
        b = bare.get(label)
        rows.append(
            [
                "\u00a0" * indent + label.lstrip(),
                f"{b['ms_per_job']:.3f}" if b else "-",
                f"{row['ms_per_job']:.3f}",
                f"{row['calls_per_job']:.2f}",
            ]
        )
    own = [
        [f"`{o['function']}`", f"{o['own_ms_per_job']:.3f}", f"{o['calls_per_job']:.1f}"]
        for o in profile["levers"]["own_time"][:12]
    ]
    return PROFILE_TEXT.format(
        jobs=profile["jobs"],
        bare_rate=profile["levers-bare"]["rate_under_profiler"],
        levers_rate=profile["levers"]["rate_under_profiler"],
        breakdown=md_table(
            ["function (cumulative)", "bare LeversWorker", "levers job path", "calls/job"], rows
        ),
        own=md_table(["function", "own ms/job", "calls/job"], own),
    )


def _cell_row(cell: Cell, handler_s: dict[int, float]) -> list[str]:
    ideal_doc = cell.workers / cell.ideal
    alone = handler_s.get(cell.semaphore) or ideal_doc
    low, high = min(cell.rates), max(cell.rates)
    return [
        str(cell.workers),
        str(cell.semaphore),
        str(cell.docs),
        f"{cell.measured:.1f}",
        f"{low:.1f}-{high:.1f}",
        f"{cell.ideal:.1f}",
        f"**{cell.efficiency:.1%}**",
        f"{cell.batch_efficiency:.1%}",
        f"{ideal_doc / alone:.1%}",
        f"{(cell.per_doc_s - alone) * 1000:.1f}",
        f"{(cell.in_worker - alone) * 1000:.1f}",
        f"{(cell.per_doc_s - cell.in_worker) * 1000:.1f}",
        f"{median(cell.worker_cpu_ms):.1f}",
        f"{median(cell.busy):.0%}",
    ]


CELL_HEADER = [
    "workers", "semaphore", "docs", "measured docs/s", "min-max", "ideal docs/s", "efficiency",
    "… over the whole batch", "handler-alone ceiling", "overhead ms/doc", "… handler slower",
    "… around the handler", "workers' CPU ms/doc", "machine busy",
]  # fmt: skip


def _efficiency_section(result: EfficiencyResult) -> str:
    rq_text = ""
    if result.rq_cells:
        table = md_table(CELL_HEADER, [_cell_row(c, result.handler_s) for c in result.rq_cells])
        rq_text = RQ_CELLS_TEXT.format(table=table)
    return EFFICIENCY_TEXT.format(
        calls=CALLS,
        call_ms=CALL_S * 1000,
        reps=result.repetitions,
        window=result.window_s,
        min_docs=min(c.docs for c in result.cells),
        table=md_table(CELL_HEADER, [_cell_row(c, result.handler_s) for c in result.cells]),
        rq_cells=rq_text,
    )


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _memory_row(setup: SetupResult) -> list[str]:
    workers = setup.workers()
    after = [w.after_gc for w in workers if w.after_gc is not None]
    kg = next((w.after_kg_job for w in workers if w.after_kg_job is not None), None)
    others = [p for p in setup.processes if not p.role.startswith("worker")]
    supervisor = next((p for p in others if p.role == "supervisor"), None)
    schedulers = [p for p in others if p.role.startswith("RQ scheduler")]
    total_pss = sum((w.after_kg_job or w.after_gc or w.idle).pss for w in workers)
    total_pss += sum(p.idle.pss for p in others)
    return [
        setup.description,
        _mb(max(w.idle.uss for w in workers)),
        _mb(max(s.uss for s in after)),
        _mb(kg.uss if kg else None),
        _mb(max(s.pss for s in after)),
        _mb(max(s.rss for s in after)),
        _mb(kg.rss if kg else None),
        _mb(supervisor.idle.uss) if supervisor else "-",
        f"{len(schedulers)} × {_mb(max(p.idle.uss for p in schedulers))}" if schedulers else "-",
        _mb(total_pss),
    ]


MEMORY_HEADER = [
    "setup", "worker USS idle", "worker USS after gc", "kg_ingest USS after its first job",
    "worker PSS after gc", "worker RSS after gc", "kg_ingest RSS after its first job", "supervisor USS",
    "RQ scheduler USS", "total PSS (all processes)",
]  # fmt: skip


def _memory_section(results: list[SetupResult]) -> str:
    preload = (
        "takes `preload: [phases.graph_store]` in pipeline.yaml"
        if src_preload()
        else "has no `preload:`, so a handler module in the project imports graph_store for the supervisor"
    )
    freeze = (
        "calls gc.freeze() before the workers fork"
        if src_freezes()
        else "does not freeze (the +gc.freeze() setup freezes in that handler module, last)"
    )
    table = md_table(MEMORY_HEADER, [_memory_row(s) for s in results])
    return MEMORY_TEXT.format(table=table, preload=preload, freeze=freeze)


def render(
    info: RunInfo,
    overhead: OverheadResult | None,
    efficiency: EfficiencyResult | None,
    memory: list[SetupResult] | None,
) -> str:
    machine_rows = [[k, v] for k, v in info.machine.items()]
    source = git_state()
    if info.src_changed:
        source += " **changed while the benchmarks ran: figures may mix two versions**"
    machine_rows += [["load average at end", info.load_after], ["levers source", source]]
    targets: list[list[str]] = []
    if overhead is not None:
        targets += _overhead_targets(overhead)
    if efficiency is not None:
        targets += _efficiency_targets(efficiency)
    if memory is not None:
        targets += _memory_targets(memory)
    sections = [
        HEADER_TEXT.format(
            command=info.command,
            started=info.started,
            minutes=info.seconds / 60,
            quick=" (quick version: fewer jobs, documents and repetitions)" if info.quick else "",
            machine=md_table(["", ""], machine_rows, numeric=False),
            targets=md_table(["target", "measured", "verdict"], targets) if targets else "(none run)",
        )
    ]
    if overhead is not None:
        sections.append(_overhead_section(overhead))
    if efficiency is not None:
        sections.append(_efficiency_section(efficiency))
    if memory is not None:
        sections.append(_memory_section(memory))
    return "\n".join(sections)
