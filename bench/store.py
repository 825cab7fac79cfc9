"""The artifact store in S3 against the local store: documents/s through the bundled pipeline.

The same documents (the bundled examples' Markdown, text and HTML, each copied ``--copies`` times
with a line of its own, so every copy is a document of its own) go through `levers up` running the
bundled pipeline.yaml offline (extraction, chunking, kg_ingest into its embedded FalkorDB), once
with the default ``store: .levers/artifacts`` and once with ``store: s3://BUCKET/RUN``, the S3 API
served by moto's server (``python -m moto.server``, a process of its own on 127.0.0.1, as MinIO
would be). Every phase reads its input from the store and writes its output there, and a
document's bytes are streamed to a local copy for extraction, so a run makes about seven store
calls per document. The variants alternate, each run in a new project directory on a flushed
Redis, after its workers are up; documents/s is the number of documents over the span from the
first submission to the last finish, read off levers' ledger.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    wait_until,
    write_section,
)

SECTION = "## 18. Artifact store in S3 against the local store"
BUCKET = "levers-bench"
RUN_TIMEOUT_S = 900.0
EXAMPLES = ("capacity-planning.md", "queues-and-backpressure.txt", "retries-and-timeouts.html")
# The S3 server's credentials: moto accepts any, the client needs some.
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}


@dataclass
class Variant:
    name: str
    docs_per_s: list[float] = field(default_factory=list)


def main(argv: list[str]) -> int:
    parser = bench_parser(
        "store",
        __doc__,
        {
            "--reps": (3, "repetitions of each variant"),
            "--copies": (15, "copies of each of the 3 example files"),
        },
    )
    args = parser.parse_args(argv)
    header = RunHeader.start(["store", *argv])
    with embedded_server() as server, s3_server() as endpoint:
        variants = run(server, endpoint, args.reps, args.copies)
    write_section(args.output, SECTION, render(variants, 3 * args.copies, header.line()))
    return 0


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server in a process of its own, with the bucket; its endpoint."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    process: subprocess.Popen[bytes] = subprocess.Popen(
        [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
        wait_until(lambda: _answers(client), 60, "moto's S3 server", poll_s=0.2)
        client.create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop_process(process)


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "region_name": "us-east-1"}


def _answers(client: Any) -> bool:
    with contextlib.suppress(Exception):  # not up yet: whatever the client raises
        client.list_buckets()
        return True
    return False


def run(server: Server, endpoint: str, reps: int, copies: int) -> list[Variant]:
    variants = [Variant("local"), Variant("s3")]
    for rep in range(reps):
        for variant in variants:
            server.connection.flushall()
            store = f"s3://{BUCKET}/run-{rep}" if variant.name == "s3" else None
            rate = _one(server.url, endpoint, store, copies)
            variant.docs_per_s.append(rate)
            sys.stderr.write(f"store: {variant.name} {rep + 1}/{reps}: {rate:.2f} documents/s\n")
    return variants


def _project(root: Path, store: str | None, copies: int) -> None:
    pipeline = (ROOT / "pipeline.yaml").read_text()
    (root / "pipeline.yaml").write_text((f"store: {store}\n" if store else "") + pipeline)
    (root / "docs").mkdir()
    for name in EXAMPLES:
        text = (ROOT / "examples" / "docs" / name).read_text()
        stem, suffix = os.path.splitext(name)
        for copy in range(copies):
            (root / "docs" / f"{stem}-{copy}{suffix}").write_text(f"{text}\n\nCopy {copy} of {name}.\n")


def _one(url: str, endpoint: str, store: str | None, copies: int) -> float:
    with tempfile.TemporaryDirectory(prefix="levers-bench-store-") as tmp:
        project = Path(tmp)
        _project(project, store, copies)
        env = bench_env(REDIS_URL=url, AWS_ENDPOINT_URL=endpoint, **S3_ENV)
        env.pop("ANTHROPIC_API_KEY", None)  # offline: the same work in both variants
        up: subprocess.Popen[bytes] = subprocess.Popen(
            [PYTHON, "-m", "levers", "up"], cwd=project, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for_idle_workers(
                url,
                "levers.extraction",
                3,
                RUN_TIMEOUT_S,
                f"the extraction workers of `levers up` in {project}",
            )
            result = subprocess.run(
                [PYTHON, "-m", "levers", "submit", "--wait", "docs"], cwd=project, env=env,
                capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
            )  # fmt: skip
        finally:
            stop_process(up)
            subprocess.run(
                [PYTHON, "-m", "levers", "down"], cwd=project, env=env, capture_output=True, check=False
            )
        if result.returncode != 0:
            raise RuntimeError(f"levers submit failed: {result.stderr[-2000:]}")
        if store is None and not (project / ".levers" / "artifacts").is_dir():
            raise RuntimeError("the local variant wrote no artifacts under .levers/artifacts")
        return _documents_per_second(url, 3 * copies)


def _documents_per_second(url: str, expected: int) -> float:
    with redis.Redis.from_url(url, decode_responses=True) as connection:
        records = [connection.hgetall(key) for key in connection.scan_iter("levers:levers:doc:*")]
    done = [r for r in records if r.get("status") == "done"]
    if len(done) != expected:
        raise RuntimeError(f"{len(done)} of {expected} documents done")
    span = max(float(r["finished"]) for r in done) - min(float(r["submitted"]) for r in done)
    return expected / span


def render(variants: list[Variant], documents: int, run_line: str) -> str:
    local, s3 = variants
    rows = [
        [label, f"{median(v.docs_per_s):.2f}", f"{min(v.docs_per_s):.2f}-{max(v.docs_per_s):.2f}"]
        for label, v in (("local directory (.levers/artifacts)", local), ("S3 (moto's server)", s3))
    ]
    header = [f"{documents} documents, bundled pipeline offline", "documents/s (median)", "min-max"]
    ratio = median(s3.docs_per_s) / median(local.docs_per_s)
    return "\n".join(
        [
            SECTION,
            "",
            run_line,
            "",
            md_table(header, rows),
            "",
            f"S3 against local: {ratio:.2f}x the documents/s (median of {len(local.docs_per_s)} runs "
            "of each, alternated). The S3 server is moto's, on this machine: it adds each call's HTTP "
            "round trip and its own CPU, not a real network's latency.",
            "",
        ]
    )
