"""Redis held per finished document: `used_memory` and keys per 1,000 documents through `levers up`.

A three-phase pipeline shaped like the bundled one (extraction -> chunking -> kg_ingest, handlers
that return small outputs at once, so only levers' own use of Redis is measured) runs under
`levers up` on a private embedded server. Its workers are up before anything is measured; the
documents (generated text files, report-0001.txt ...) go in with one `levers submit`. Once every
document is done and no job is held any more, the server's `used_memory` and key count are read
again: the difference, per 1,000 documents, is what finished documents keep. Keys are grouped by
kind, each group's bytes summed with MEMORY USAGE.

Then, where the code has `retention:` (7 days here), every finished document is expired as the
supervisor's pass does it once `retention` has gone by (the same call, its clock moved past the
retention), keys that expire by themselves within the retention are dropped as they will be by
then, and the figures are read a third time: what dedup's index and the versions' numbering keep.

`--label` names the row (run it on another checkout with that checkout's `src` first on
PYTHONPATH for a "before" row); rows of other labels already in RESULTS.md are kept.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.common import (
    PYTHON,
    RunHeader,
    bench_env,
    bench_parser,
    embedded_server,
    md_table,
    results_text,
    stop_process,
    wait_until,
    write_section,
)

SECTION = "## 13. Redis footprint per 1,000 finished documents"
PIPELINE_NAME = "footprint"
PHASES = ("extraction", "chunking", "kg_ingest")
RUN_TIMEOUT_S = 1800.0

HANDLERS = '''"""The footprint benchmark's phases: small outputs, at once."""

def extraction(doc, ctx):
    text = doc.read_bytes().decode()
    return {"text": text, "title": doc.name, "pages": 1}

def chunking(doc, ctx):
    return {"chunks": [{"text": doc.input["text"], "context": doc.input["title"]}]}

def kg_ingest(doc, ctx):
    return {"episodes": len(doc.input["chunks"])}
'''

PIPELINE = """name: footprint
retention: 7
phases:
  extraction:
    handler: footprintphases:extraction
    accepts: [.txt]
    next: chunking
    levers: {workers: 2}
  chunking:
    handler: footprintphases:chunking
    next: kg_ingest
    levers: {workers: 2}
  kg_ingest:
    handler: footprintphases:kg_ingest
    levers: {workers: 2}
"""

WORDS = ["levers", "pipeline", "worker", "queue", "graph", "entity", "chunk", "phase", "document",
         "ledger", "redis", "store"]  # fmt: skip


@dataclass(frozen=True)
class Reading:
    used_memory: int
    keys: int
    by_kind: dict[str, tuple[int, int]]  # kind -> (keys, bytes)


@dataclass(frozen=True)
class Footprint:
    documents: int
    drain_s: float
    idle: Reading
    finished: Reading
    expired: Reading | None  # after retention, where the code has it

    def per_thousand(self, after: Reading) -> tuple[float, float]:
        scale = 1000 / self.documents
        return (after.used_memory - self.idle.used_memory) * scale, (after.keys - self.idle.keys) * scale


def kind_of(key: str) -> str:
    for prefix, kind in (
        (f"levers:{PIPELINE_NAME}:doc:", "ledger records"),
        (f"levers:{PIPELINE_NAME}:finished", "finished set (ids by finish time)"),
        (f"levers:{PIPELINE_NAME}:expired", "expired set (deduplication's index)"),
        (f"levers:{PIPELINE_NAME}:reuse:", "reuse index (an entry per phase)"),
        (f"levers:{PIPELINE_NAME}:versions:", "versions (a hash per name)"),
        (f"levers:{PIPELINE_NAME}:version-names", "names with versions (a set)"),
        (f"levers:{PIPELINE_NAME}:version-latest", "latest version of expired names (a hash)"),
        ("rq:job:", "RQ job hashes"),
        ("rq:results:", "RQ results"),
        ("rq:execution", "RQ executions"),
    ):
        if key.startswith(prefix):
            return kind
    if key.startswith(f"levers:{PIPELINE_NAME}:"):
        return "levers, other"
    return "RQ, other"


def read(connection: redis.Redis) -> Reading:
    names = [k.decode() for k in connection.scan_iter(count=1000)]
    with connection.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.memory_usage(name, samples=0)
        sizes = pipe.execute()
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for name, bytes_ in zip(names, sizes, strict=True):
        count[kind_of(name)] += 1
        size[kind_of(name)] += int(bytes_ or 0)
    used = int(connection.info("memory")["used_memory"])
    return Reading(used, int(connection.dbsize()), {k: (count[k], size[k]) for k in count})


def make_project(root: Path, documents: int) -> None:
    (root / "footprintphases.py").write_text(HANDLERS)
    (root / "pipeline.yaml").write_text(PIPELINE)
    docs = root / "docs"
    docs.mkdir()
    for i in range(documents):
        words = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40))
        (docs / f"report-{i:05}.txt").write_text(f"Report {i}\n\n{words} {i}\n")


def done(connection: redis.Redis) -> int:
    return int(connection.hget(f"levers:{PIPELINE_NAME}:phase:kg_ingest:totals", "done") or 0)


def settled(connection: redis.Redis) -> bool:
    """No job held or queued: RQ's part of every job is recorded too."""
    return not any(
        connection.zcard(f"rq:wip:{PIPELINE_NAME}.{phase}")
        or connection.llen(f"rq:queue:{PIPELINE_NAME}.{phase}")
        for phase in PHASES
    )


def expire_all(root: Path, connection: redis.Redis) -> Reading | None:
    """Every finished document expired as the supervisor's pass expires it past `retention`; None
    where the code has no retention."""
    if importlib.util.find_spec("levers.documents.retention") is None:
        return None
    from levers.documents.retention import Retention
    from levers.pipeline.loading import load_pipeline

    spec = load_pipeline(root / "pipeline.yaml").spec
    Retention(connection, spec).expire(retention_s=0.0)
    # what expires by itself within the retention (reuse entries) is gone by then too
    for name in list(connection.scan_iter(f"levers:{PIPELINE_NAME}:*", count=1000)):
        if 0 < int(connection.ttl(name)) <= (spec.retention or 0) * 86400:
            connection.delete(name)
    return read(connection)


def run(documents: int) -> Footprint:
    with embedded_server() as server, tempfile.TemporaryDirectory(prefix="levers-footprint-") as tmp:
        root = Path(tmp)
        make_project(root, documents)
        env = bench_env(REDIS_URL=server.url)
        env["PYTHONPATH"] = os.pathsep.join([str(root), env["PYTHONPATH"]])
        up = subprocess.Popen([PYTHON, "-m", "levers", "up"], cwd=root, env=env, stderr=subprocess.DEVNULL)
        try:
            workers = f"rq:workers:{PIPELINE_NAME}."
            wait_until(
                lambda: all(server.connection.scard(workers + p) == 2 for p in PHASES), 120, "the workers"
            )
            idle = read(server.connection)
            began = time.monotonic()
            subprocess.run(
                [PYTHON, "-m", "levers", "submit", "docs"], cwd=root, env=env, check=True,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            wait_until(lambda: done(server.connection) == documents, RUN_TIMEOUT_S, "every document", 0.5)
            drain_s = time.monotonic() - began
            wait_until(lambda: settled(server.connection), 60, "the last jobs to settle", 0.2)
            finished = read(server.connection)
            expired = expire_all(root, server.connection)
        finally:
            stop_process(up)
    return Footprint(documents, drain_s, idle, finished, expired)


HEADER = ["code", "documents", "drain s", "used_memory / 1,000 done", "keys / 1,000 done",
          "after retention: used_memory / 1,000", "keys / 1,000"]  # fmt: skip


def row(label: str, result: Footprint) -> list[str]:
    memory, keys = result.per_thousand(result.finished)
    cells = [
        label,
        f"{result.documents:,}",
        f"{result.drain_s:.0f}",
        f"{memory / 1e6:.2f} MB",
        f"{keys:,.0f}",
    ]
    if result.expired is None:
        return [*cells, "(no retention)", "-"]
    memory_x, keys_x = result.per_thousand(result.expired)
    return [*cells, f"{memory_x / 1e3:.1f} kB", f"{keys_x:,.0f}"]


def breakdown(result: Footprint) -> str:
    readings = [("done", result.finished)] + ([("expired", result.expired)] if result.expired else [])
    kinds = sorted({k for _, r in readings for k in r.by_kind})
    rows = []
    for kind in kinds:
        cells = [kind]
        for _, reading in readings:
            keys, bytes_ = reading.by_kind.get(kind, (0, 0))
            cells += [f"{keys:,}", f"{bytes_ / result.documents:,.0f}"]
        rows.append(cells)
    header = ["kind"] + [h for name, _ in readings for h in (f"keys ({name})", f"bytes per doc ({name})")]
    return md_table(header, rows)


def kept_rows(text: str, label: str) -> list[list[str]]:
    """The rows of other labels in the section's table as RESULTS.md has it."""
    start = text.find(SECTION)
    if start < 0:
        return []
    end = text.find("\n## ", start + 1)
    rows = []
    for line in text[start : end if end >= 0 else len(text)].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == len(HEADER) and cells[0] not in (label, HEADER[0]):
            rows.append(cells)
    return rows


def render(label: str, result: Footprint, others: list[list[str]], run_line: str) -> str:
    return f"""{SECTION}

{run_line}

A three-phase pipeline shaped like the bundled one (handlers that return small outputs at once),
2 workers per phase, {result.documents:,} generated text documents in one `levers submit`. Per
1,000 finished documents: the server's `used_memory` and key count once every document was done,
less the same figures with the workers up and nothing submitted; "after retention": once every
finished document's record was expired as `retention:` expires it.

{md_table(HEADER, [*others, row(label, result)])}

Where the bytes are in the last run ({label}), by kind of key (MEMORY USAGE, per document):

{breakdown(result)}
"""


def main(argv: list[str]) -> int:
    parser = bench_parser(
        "footprint",
        __doc__,
        {"--documents": (1000, "documents to run")},
        label="the row's name (default: the git state of src/)",
    )
    args = parser.parse_args(argv)
    header = RunHeader.start(["footprint", *argv])
    label = args.label or header.source
    result = run(args.documents)
    others = kept_rows(results_text(args.output), label)
    write_section(args.output, SECTION, render(label, result, others, header.line()))
    return 0
