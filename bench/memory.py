"""Benchmark 3: memory of idle workers with the phases' libraries imported.

levers' workers are forked from the supervisor after it imported every handler once, so they
share those pages until they write to them; a plain ``rq worker`` imports the same libraries
itself. Per worker process: USS (memory only it holds: what one more worker costs), PSS
(shared pages split among their sharers: what adds up to the machine's total) and RSS.

Each setup runs one worker per phase (extraction, chunking, kg_ingest) and is measured three
times: idle right after start; after a job that runs ``gc.collect()`` in every worker (a full
collection writes to the header of every tracked object, so pages a forked worker shared with
its supervisor become its own: any worker that has run real jobs gets there, so this is the
figure to plan with); and the kg_ingest worker after a job that imports ``phases.graph_store``
and collects, which is what its first real kg_ingest job does when graph_store is lazy.

Setups (``phases.graph_store`` imports graphiti; ``kg_ingest`` imports it only when it runs),
adapted to what src/ supports (``preload:`` in pipeline.yaml, ``gc.freeze()`` in preload_handlers):
- levers, graph_store lazy: handlers preloaded, graph_store imported in each worker on first use
- levers, graph_store preloaded: ``preload: [phases.graph_store]`` when the pipeline model has it,
  else a handler module in the project that imports it
- the same with ``gc.freeze()`` turned off (bench.supervise) when src freezes, or added (by that
  handler module, as the last import of the preload) when it does not
- three plain ``rq worker -w <SimpleWorker subclass>`` processes (one per phase's queue) whose
  worker-class module imports the same libraries, without / with graph_store
"""

from __future__ import annotations

import inspect
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rq import Queue, Worker
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from bench.common import PYTHON, Server, bench_env, stop_process, wait_until
from bench.projects import write_file
from levers import keys
from levers.pipeline.model import Pipeline
from levers.supervisor import processes as pool

PIPELINE = "memory"
PHASES = ("extraction", "chunking", "kg_ingest")
PLAIN_PREFIX = "plain"
SETTLE_S = 1.0
START_TIMEOUT_S = 90.0
MB = 1024 * 1024

HANDLERS = {
    "extraction": "phases.extraction:extract",
    "chunking": "phases.chunking:chunk",
    "kg_ingest": "phases.kg_ingest:ingest_graph",
}

PROBE = '''"""A job that runs a full garbage collection in the worker that takes it."""

import gc


def collect():
    gc.collect()


def first_kg_job():
    import phases.graph_store  # noqa: F401  (what kg_ingest imports on its first job)

    gc.collect()
'''

PRELOAD = '''"""kg_ingest's handler; phases.graph_store (graphiti) is imported by the supervisor's preload."""

import phases.graph_store  # noqa: F401
from phases.kg_ingest import ingest_graph  # noqa: F401
{freeze}'''

FREEZE = """
import gc

# preload_handlers imports this module last (kg_ingest is the last phase): everything imported
# so far goes to the permanent generation, which collections in the forked workers never touch
gc.freeze()
"""

PLAIN_WORKERS = '''"""An `rq worker -w` class whose module imports the phases' libraries (plain RQ)."""

import phases.chunking  # noqa: F401
import phases.extraction  # noqa: F401
import phases.kg_ingest  # noqa: F401
{graph}from rq import SimpleWorker


class PhasesWorker(SimpleWorker):
    """RQ's SimpleWorker, started with the phases' modules imported."""
'''


@dataclass(frozen=True)
class Sample:
    uss: float
    pss: float
    rss: float

    @classmethod
    def of(cls, pid: int) -> Sample:
        info = psutil.Process(pid).memory_full_info()
        return cls(info.uss / MB, info.pss / MB, info.rss / MB)


@dataclass
class ProcessMemory:
    role: str  # "worker extraction", "supervisor", "RQ scheduler", ...
    idle: Sample
    after_gc: Sample | None = None
    after_kg_job: Sample | None = None  # the kg_ingest worker, after importing graph_store


@dataclass
class SetupResult:
    name: str
    description: str
    processes: list[ProcessMemory] = field(default_factory=list)
    graph_store: bool = False
    frozen: bool = False  # the supervisor froze its objects before forking

    def workers(self) -> list[ProcessMemory]:
        return [p for p in self.processes if p.role.startswith("worker")]


@dataclass(frozen=True)
class Setup:
    name: str
    description: str
    kind: str  # "levers" or "plain"
    graph_store: bool
    freeze: bool = False  # whether the supervisor freezes (levers only)


def src_preload() -> bool:
    """Whether pipeline.yaml can list modules to preload (``preload:``)."""
    return "preload" in Pipeline.model_fields


def src_freezes() -> bool:
    """Whether levers' preload_handlers freezes the supervisor's objects before the workers fork."""
    return "gc.freeze" in inspect.getsource(pool.preload_handlers)


def setups() -> tuple[Setup, ...]:
    freezes = src_freezes()
    how = "`preload:`" if src_preload() else "a handler module"
    alternative = (
        Setup(
            "levers+graph-freeze", f"levers, graph_store preloaded ({how}), gc.freeze() off", "levers", True
        )
        if freezes
        else Setup(
            "levers+graph+freeze",
            f"levers, graph_store preloaded ({how}) + gc.freeze()",
            "levers",
            True,
            True,
        )
    )
    return (
        Setup("levers", "levers, graph_store lazy", "levers", graph_store=False, freeze=freezes),
        Setup("levers+graph", f"levers, graph_store preloaded ({how})", "levers", True, freeze=freezes),
        alternative,
        Setup("rq", "plain rq worker (SimpleWorker), graph_store lazy", "plain", graph_store=False),
        Setup("rq+graph", "plain rq worker (SimpleWorker), graph_store imported", "plain", graph_store=True),
    )


def _levers_project(root: Path, setup: Setup) -> Path:
    write_file(root / "bench_probe.py", PROBE)
    kg_handler = HANDLERS["kg_ingest"]
    preload = setup.graph_store and src_preload()
    if setup.graph_store and not preload:
        emulate_freeze = setup.freeze and not src_freezes()
        write_file(root / "preload_graph.py", PRELOAD.format(freeze=FREEZE if emulate_freeze else ""))
        kg_handler = "preload_graph:ingest_graph"
    handlers = {**HANDLERS, "kg_ingest": kg_handler}
    lines = [f"name: {PIPELINE}"]
    if preload:
        lines.append("preload: [phases.graph_store]")
    lines.append("phases:")
    for i, phase in enumerate(PHASES):
        lines += [f"  {phase}:", f"    handler: {handlers[phase]}", "    levers:", "      workers: 1"]
        if i == 0:
            lines.append("    accepts: [.txt]")
        if i + 1 < len(PHASES):
            lines.append(f"    next: {PHASES[i + 1]}")
    pipeline = root / "pipeline.yaml"
    write_file(pipeline, "\n".join(lines) + "\n")
    return pipeline


def _plain_project(root: Path, setup: Setup) -> str:
    write_file(root / "bench_probe.py", PROBE)
    graph = "import phases.graph_store  # noqa: F401\n" if setup.graph_store else ""
    write_file(root / "plain_worker.py", PLAIN_WORKERS.format(graph=graph))
    return "plain_worker.PhasesWorker"


def _start(server: Server, root: Path, setup: Setup) -> tuple[list[subprocess.Popen[bytes]], list[Queue]]:
    """Start the setup's processes and wait until one idle worker listens on each phase's queue."""
    unfrozen = setup.kind == "levers" and not setup.freeze and src_freezes()
    env = bench_env(REDIS_URL=server.url)
    log = (root / "process.log").open("ab")
    if setup.kind == "levers":
        pipeline = _levers_project(root, setup)
        names = [keys.queue_name(PIPELINE, p) for p in PHASES]
        # the real `levers up`; through bench.supervise (gc.freeze off) only to undo src's freeze
        up = (
            ["-m", "bench.supervise", str(pipeline)]
            if unfrozen
            else ["-m", "levers", "up", "-f", str(pipeline)]
        )
        commands = [[PYTHON, *up]]
    else:
        worker_class = _plain_project(root, setup)
        rq_cli = str(Path(PYTHON).with_name("rq"))
        names = [f"{PLAIN_PREFIX}.{p}" for p in PHASES]
        commands = [
            [rq_cli, "worker", "-w", worker_class, "-P", str(root), "-u", server.url, "-S", "json", name]
            for name in names
        ]
    processes = [
        subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        for command in commands
    ]
    log.close()
    queues = [Queue(n, connection=server.connection, serializer=JSONSerializer) for n in names]

    def ready() -> bool:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{setup.name}: exit {process.returncode}; see {root / 'process.log'}")
        return all(len(ws := Worker.all(queue=q)) == 1 and ws[0].get_state() == "idle" for q in queues)

    wait_until(ready, START_TIMEOUT_S, f"{setup.name} workers", poll_s=0.1)
    return processes, queues


def _roles(processes: list[subprocess.Popen[bytes]], queues: list[Queue], setup: Setup) -> dict[int, str]:
    """pid -> role: the workers (from RQ's registry), their children, and the supervisor."""
    roles: dict[int, str] = {}
    for queue in queues:
        (worker,) = Worker.all(queue=queue)
        assert worker.pid is not None
        roles[worker.pid] = f"worker {queue.name.split('.', 1)[1]}"
        for child in psutil.Process(worker.pid).children():
            roles[child.pid] = f"RQ scheduler of {queue.name.split('.', 1)[1]}"
    if setup.kind == "levers":
        roles[processes[0].pid] = "supervisor"
    return roles


def _probe(queues: list[Queue], function: str) -> None:
    jobs = [q.enqueue_call(function) for q in queues]
    wait_until(
        lambda: all(j.get_status(refresh=True) == JobStatus.FINISHED for j in jobs), 60, f"{function} jobs"
    )
    time.sleep(0.2)


def measure(server: Server, setup: Setup, workdir: Path) -> SetupResult:
    server.connection.flushdb()
    root = workdir / setup.name
    root.mkdir(parents=True)
    processes, queues = _start(server, root, setup)
    try:
        time.sleep(SETTLE_S)
        roles = _roles(processes, queues, setup)
        samples = {pid: ProcessMemory(role, Sample.of(pid)) for pid, role in roles.items()}
        _probe(queues, "bench_probe.collect")
        for pid, memory in samples.items():
            if memory.role.startswith("worker"):
                memory.after_gc = Sample.of(pid)
        kg_queue = next(q for q in queues if q.name.endswith("kg_ingest"))
        _probe([kg_queue], "bench_probe.first_kg_job")
        (kg_worker,) = Worker.all(queue=kg_queue)
        assert kg_worker.pid is not None
        samples[kg_worker.pid].after_kg_job = Sample.of(kg_worker.pid)
    finally:
        for process in processes:
            stop_process(process)
    frozen = setup.kind == "levers" and setup.freeze
    return SetupResult(setup.name, setup.description, list(samples.values()), setup.graph_store, frozen)


def run(progress: Callable[[str], object] = print, server: Server | None = None) -> list[SetupResult]:
    assert server is not None
    results = []
    with tempfile.TemporaryDirectory(prefix="levers-bench-memory-") as tmp:
        for setup in setups():
            result = measure(server, setup, Path(tmp))
            workers = result.workers()
            idle = max(w.idle.uss for w in workers)
            after = max(w.after_gc.uss for w in workers if w.after_gc)
            kg = max(w.after_kg_job.uss for w in workers if w.after_kg_job)
            progress(
                f"  memory {setup.description:<52} worker USS MB: {idle:5.1f} idle, {after:5.1f} after gc, "
                f"kg_ingest after its first job {kg:5.1f}"
            )
            results.append(result)
    return results
