"""Batching: the bundled pipeline (offline) on small documents (about 1 KB), its phases one job at
a time (``batch.size=1``, kg_ingest through ``ingest_graph``) against batches of 10 (``batch:
{size: 10, wait_ms: 200}`` on extraction, chunking and kg_ingest, kg_ingest through
``ingest_graphs``, its batch handler), in one run.

The documents are split into rounds; each round's documents go through both variants one after the
other, in alternating order (the machine is shared: a load that changes during the run then weighs
on both), each variant in a project, Redis and graph of its own that the earlier rounds filled.
Reported per variant and phase: documents per second over the span from the phase's first start to
its last finish, summed over the rounds, and the mean seconds per job (a batch's time shared by its
documents).

``bin/bench batching [--documents N] [--rounds R] [--output FILE]`` writes section 17 of RESULTS.md.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

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
    wait_until,
    write_section,
)
from bench.scale import PIPELINE, Batch, _settled, _tally, document
from levers.documents.ledger import Ledger
from levers.pipeline.loading import load_pipeline

SECTION = "## 17. Batching: small documents one at a time against batches of 10"
PHASES = ("extraction", "chunking", "kg_ingest")
DOC_BYTES = 1000  # about 1 KB of text per document
ROUND_TIMEOUT_S = 3600.0
ONE_AT_A_TIME = [
    *(f"{phase}.batch.size=1" for phase in PHASES),
    "kg_ingest.handler=phases.kg_ingest:ingest_graph",
]
BATCHED = [
    *(f"{phase}.batch.size=10" for phase in PHASES),
    *(f"{phase}.batch.wait_ms=200" for phase in PHASES),
    "kg_ingest.handler=phases.kg_ingest:ingest_graphs",
]


@dataclass
class Variant:
    """One side of the comparison: its project and server, and what its rounds measured."""

    name: str
    settings: list[str]
    server: Server | None = None
    project: Path = Path()
    rounds: list[Batch] = field(default_factory=list)

    def total(self, phase: str) -> tuple[float, float]:
        """Documents per second over the rounds' summed spans, and the mean seconds per job."""
        runs = [b for b in self.rounds if phase in b.phases]
        spans = sum(b.done / b.phases[phase][0] for b in runs if b.phases[phase][0] > 0)
        done = sum(b.done for b in runs)
        per_job = sum(b.phases[phase][1] * b.done for b in runs) / done if done else 0.0
        return (done / spans if spans else 0.0), per_job

    @property
    def rate(self) -> float:
        seconds = sum(b.seconds for b in self.rounds)
        return sum(b.done for b in self.rounds) / seconds if seconds else 0.0


def small_document(pick: random.Random, number: int) -> str:
    """A generated report (bench.scale's) cut to about DOC_BYTES at a paragraph's end."""
    kept: list[str] = []
    for paragraph in document(pick, number).split("\n\n"):
        kept.append(paragraph.strip())
        if sum(len(p) + 2 for p in kept) >= DOC_BYTES:
            break
    return "\n\n".join(kept) + "\n"


def write_round(directory: Path, number: int, count: int) -> None:
    directory.mkdir(parents=True)
    pick = random.Random(5000 + number)
    for i in range(count):
        serial = number * count + i
        (directory / f"note-{serial:06d}.txt").write_text(small_document(pick, serial))


def prepare(variant: Variant, root: Path, env: dict[str, str]) -> None:
    variant.project = root / variant.name
    variant.project.mkdir()
    shutil.copy(ROOT / "pipeline.yaml", variant.project / "pipeline.yaml")
    if variant.settings:
        levers_cli(["set", *variant.settings], variant.project, env)


def run_round(variant: Variant, docs: Path, number: int, env: dict[str, str]) -> Batch:
    """``docs`` through ``variant``'s own `levers up`, from submission to the last one settled."""
    assert variant.server is not None
    connection = variant.server.connection
    env = {**env, "REDIS_URL": variant.server.url}
    loaded = load_pipeline(variant.project / "pipeline.yaml")
    with (variant.project / "up.log").open("ab") as log:
        supervisor = subprocess.Popen(
            [PYTHON, "-m", "levers", "up"], cwd=variant.project, env=env, stdout=log, stderr=log
        )
    try:
        workers = sum(p.levers.workers for p in loaded.spec.phases.values())
        wait_until(lambda: len(Worker.all(connection=connection)) >= workers, 300, "the workers", 0.2)
        batch = Batch(number, 0)
        started = time.time()
        # the ids `levers submit` prints: a document done before it returns has left the queued set
        ids = levers_cli(["submit", str(docs)], variant.project, env).split()
        ledger = Ledger(connection, PIPELINE)
        wait_until(lambda: _settled(ledger, ids), ROUND_TIMEOUT_S, f"round {number} ({variant.name})", 0.5)
        _tally(ledger, ids, batch, started, list(PHASES))
    finally:
        stop_process(supervisor, timeout_s=120)
    return batch


def run(root: Path, documents: int, rounds: int) -> list[Variant]:
    env = bench_env()
    for offline in ("ANTHROPIC_API_KEY", "FALKORDB_URL", "REDIS_URL"):
        env.pop(offline, None)
    variants = [Variant("one at a time", ONE_AT_A_TIME), Variant("batches of 10", BATCHED)]
    size = documents // rounds
    with ExitStack() as stack:
        for variant in variants:
            variant.server = stack.enter_context(embedded_server())
            prepare(variant, root, {**env, "REDIS_URL": variant.server.url})
        try:
            for number in range(rounds):
                docs = root / f"round-{number}"
                write_round(docs, number, size)
                for variant in variants if number % 2 == 0 else variants[::-1]:
                    batch = run_round(variant, docs, number, env)
                    variant.rounds.append(batch)
                    sys.stderr.write(
                        f"batching: round {number + 1}/{rounds} {variant.name}: {batch.seconds:.1f} s, "
                        f"{batch.rate:.2f} documents/s\n"
                    )
        finally:
            for variant in variants:
                assert variant.server is not None
                levers_cli(
                    ["down"], variant.project, {**env, "REDIS_URL": variant.server.url}
                )  # the graph's server
    return variants


def render(variants: list[Variant], run_line: str) -> str:
    one, batched = variants
    header = ["phase", f"{one.name}: docs/s (s/job)", f"{batched.name}: docs/s (s/job)", "batches / one"]
    rows = []
    for phase in PHASES:
        (a, a_job), (b, b_job) = one.total(phase), batched.total(phase)
        rows.append(
            [phase, f"{a:.2f} ({a_job:.3f})", f"{b:.2f} ({b_job:.3f})", f"{b / a:.2f}x" if a else "-"]
        )
    rows.append(["whole pipeline", f"{one.rate:.2f}", f"{batched.rate:.2f}",
                 f"{batched.rate / one.rate:.2f}x" if one.rate else "-"])  # fmt: skip
    per_round = [
        [i + 1, *(f"{r.done} / {r.failed}, {r.seconds:.1f} s" for r in (v.rounds[i] for v in variants))]
        for i in range(len(one.rounds))
    ]
    return "\n".join([
        SECTION,
        "",
        run_line,
        "",
        f"The bundled pipeline (offline) on generated text documents of about {DOC_BYTES} bytes",
        "(bench.scale's reports, cut short), one job at a time (`batch.size=1`, kg_ingest through",
        "`ingest_graph`) against `batch: {size: 10, wait_ms: 200}` on extraction, chunking and kg_ingest",
        "(kg_ingest through `ingest_graphs`: a batch's documents on one connection). Each round's",
        "documents go through both, in alternating order, each in a project, Redis and graph of its",
        "own. Per phase: documents per second over the span from its first start to its last finish,",
        "summed over the rounds, and the mean seconds per job (a batch's time shared by its documents).",
        "",
        md_table(header, rows, numeric=False),
        "",
        md_table(["round", *(f"{v.name}: done / failed, drain" for v in variants)], per_round, numeric=False),
        "",
    ])  # fmt: skip


def main(argv: list[str]) -> int:
    parser = bench_parser(
        "batching",
        __doc__,
        {
            "--documents": (2000, "documents per variant"),
            "--rounds": (4, "rounds they are split into"),
        },
    )
    args = parser.parse_args(argv)
    if args.documents < args.rounds:
        parser.error("--documents must be at least --rounds")
    header = RunHeader.start(["batching", *argv])
    with tempfile.TemporaryDirectory(prefix="levers-bench-batching-") as tmp:
        variants = run(Path(tmp), args.documents, args.rounds)
    write_section(args.output, SECTION, render(variants, header.line()))
    return 0
