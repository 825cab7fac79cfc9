"""Broken documents through the bundled pipeline: permanent errors fail at once, against the same files
whose errors are retried (the behaviour before levers.Permanent).

Seven files no retry can fix (text named .pdf, a truncated PDF, random bytes named .docx, a
non-ZIP .docx, binary .txt, HTML and Markdown without text) go to `levers up` running the bundled
pipeline.yaml (extraction: 3 workers, retries 2, retry_delay 5 s), once its workers are up, with
`levers submit --wait`. The baseline is the same run with
extraction's handler wrapped so that its errors are plain exceptions: each document then runs its
two retries and their waits (5 s, then 10 s) before it fails. Figures per variant, median of the
repetitions (alternated, each on a flushed server): the wall time of `levers submit --wait` and
the span from the first submission to the last failure, read off levers' ledger.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.common import (
    PYTHON,
    ROOT,
    RunHeader,
    Server,
    bench_env,
    bench_parser,
    embedded_server,
    md_table,
    median,
    stop_process,
    wait_for_idle_workers,
    write_section,
)

SECTION = "## 9. Broken documents: permanent errors fail at once"
# The bundled pipeline's extraction workers, all up before the files are submitted.
EXTRACTION_WORKERS = 3
RUN_TIMEOUT_S = 600.0

BROKEN = {
    "notes.pdf": b"just text, not a pdf",
    "cut.pdf": b"%PDF-1.4\n garbage",
    "random.docx": bytes((i * 73 + 11) % 256 for i in range(3000)),
    "fake.docx": b"PK\x03\x04junk",
    "binary.txt": b"\x00\x01\x02\x03\x04\x05binary\x00\x00\x00\x00\x00",
    "empty.html": b"<html><body></body></html>",
    "blank.md": b"   \n\n  ",
}

# The baseline's extraction: the bundled handler, its permanent errors turned into plain ones.
AS_BEFORE = """
from phases.extraction import extract


async def extract_retried(doc, ctx):
    try:
        return await extract(doc, ctx)
    except Exception as exc:
        raise RuntimeError(str(exc)) from None
"""


@dataclass(frozen=True)
class Variant:
    name: str
    wall_s: list[float]
    span_s: list[float]
    attempts: list[int]


def main(argv: list[str]) -> int:
    args = bench_parser("broken", __doc__, {"--reps": (3, "repetitions of each variant")}).parse_args(argv)
    header = RunHeader.start(["broken", *argv])
    with embedded_server() as server:
        variants = run(server, args.reps)
    write_section(args.output, SECTION, render(variants, header.line()))
    return 0


def run(server: Server, reps: int) -> list[Variant]:
    variants = [Variant("retried", [], [], []), Variant("permanent", [], [], [])]
    for rep in range(reps):
        for variant in variants:
            server.connection.flushall()
            wall, span, attempts = _one(server.url, retried=variant.name == "retried")
            variant.wall_s.append(wall)
            variant.span_s.append(span)
            variant.attempts.append(attempts)
            sys.stderr.write(f"broken: {variant.name} {rep + 1}/{reps}: run {wall:.1f} s, ")
            sys.stderr.write(f"submission to the last failure {span:.2f} s\n")
    return variants


def _one(url: str, retried: bool) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory(prefix="levers-bench-broken-") as tmp:
        project = Path(tmp)
        pipeline = (ROOT / "pipeline.yaml").read_text()
        if retried:
            (project / "as_before.py").write_text(AS_BEFORE)
            pipeline = pipeline.replace("phases.extraction:extract", "as_before:extract_retried")
        (project / "pipeline.yaml").write_text(pipeline)
        (project / "broken").mkdir()
        for name, data in BROKEN.items():
            (project / "broken" / name).write_bytes(data)
        env = bench_env(REDIS_URL=url)
        up: subprocess.Popen[bytes] = subprocess.Popen(
            [PYTHON, "-m", "levers", "up"], cwd=project, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for_idle_workers(
                url,
                "levers.extraction",
                EXTRACTION_WORKERS,
                RUN_TIMEOUT_S,
                f"the extraction workers of `levers up` in {project}",
            )
            started = time.monotonic()
            result = subprocess.run(
                [PYTHON, "-m", "levers", "submit", "--wait", "broken"], cwd=project, env=env,
                capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
            )  # fmt: skip
            wall = time.monotonic() - started
        finally:
            stop_process(up)
        if result.returncode != 0:
            raise RuntimeError(f"levers submit failed: {result.stderr[-2000:]}")
        span, attempts = _ledger_span(url)
        return wall, span, attempts


def _ledger_span(url: str) -> tuple[float, int]:
    with redis.Redis.from_url(url, decode_responses=True) as connection:
        records = [connection.hgetall(key) for key in connection.scan_iter("levers:levers:doc:*")]
    submitted = min(float(r["submitted"]) for r in records)
    finished = max(float(r["finished"]) for r in records)
    return finished - submitted, sum(int(r.get("extraction:attempts", 0)) for r in records)


def _figure(values: list[float], digits: int) -> str:
    return f"{median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def render(variants: list[Variant], run_line: str) -> str:
    before, after = variants
    rows = [
        [label, _figure(v.wall_s, 1), _figure(v.span_s, 2), f"{median(v.attempts):.0f}"]
        for label, v in (("retried, as before", before), ("levers.Permanent", after))
    ]
    header = ["7 broken files, bundled pipeline", "`levers submit --wait` s", "submission to last failure s"]
    ratio = median(before.span_s) / median(after.span_s)
    return "\n".join(
        [
            SECTION,
            "",
            run_line,
            "",
            md_table([*header, "attempts"], rows),
            "",
            f"From submission to the last failure: {ratio:.0f}x shorter when permanent errors fail at once "
            "(the baseline waits 5 s, then 10 s, between its tries). Median (min-max) of the repetitions.",
            "",
        ]
    )
