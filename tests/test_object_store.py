"""The artifact store in S3: moto's server mode (a real S3 HTTP API on 127.0.0.1) and the real
obstore client, end to end with `levers run` and against the errors a user meets."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psutil
import pytest
import redis
from moto.server import ThreadedMotoServer

from levers.documents.object_store import ObjectStore
from tests.conftest import StartLevers, doc_field, free_port, levers, make_project, stop, submit, wait_until

ROOT = Path(__file__).parent.parent
BUCKET = "levers-test"


class S3:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "levers-test", "AWS_REGION": "us-east-1",
        "AWS_SECRET_ACCESS_KEY": "not-shown-anywhere",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    try:
        bucket = S3(endpoint)
        bucket.client.create_bucket(Bucket=BUCKET)
        yield bucket
    finally:
        server.stop()


def test_documents_and_cached_values_are_written_once_outputs_again(s3: S3, tmp_path: Path) -> None:
    store = ObjectStore(f"s3://{BUCKET}/one", tmp_path / "downloads")
    store.put_document("ab" * 10, "report.pdf", b"%PDF the first bytes")
    store.put_document("ab" * 10, "report.pdf", b"other bytes under the same id")  # create only
    store.put_cached("transcripts", "cafe01", {"text": "first"})
    store.put_cached("transcripts", "cafe01", {"text": "second"})
    store.put_output("ab" * 10, "chunking", {"chunks": 1})
    store.put_output("ab" * 10, "chunking", {"chunks": 2})  # a phase run again replaces its output

    local = store.document_file("ab" * 10, "report.pdf")
    assert local.read_bytes() == b"%PDF the first bytes"
    assert store.cached("transcripts", "cafe01") == {"text": "first"}
    assert store.cached("transcripts", "beef02") is None
    assert store.output("ab" * 10, "chunking") == {"chunks": 2}
    assert store.has_document("ab" * 10, "report.pdf") and not store.has_output("ab" * 10, "kg_ingest")
    with pytest.raises(FileNotFoundError):
        store.output("ab" * 10, "kg_ingest")

    store.release(local)
    assert not local.exists()
    store.remove_document("ab" * 10)
    assert s3.keys("one/") == ["one/cache/transcripts/ca/cafe01.json"]
    store.remove_document("../one")  # not a document id: nothing is listed or removed
    assert s3.keys("one/") == ["one/cache/transcripts/ca/cafe01.json"]


def bundled_project(root: Path, store: str) -> Path:
    shutil.copytree(ROOT / "examples" / "docs", root / "docs")
    shutil.copytree(ROOT / "src" / "phases", root / "phases")
    (root / "pipeline.yaml").write_text(f"store: {store}\n" + (ROOT / "pipeline.yaml").read_text())
    return root


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_the_bundled_pipeline_runs_on_an_s3_store(s3: S3, tmp_path: Path) -> None:
    root = bundled_project(tmp_path / "project", f"s3://{BUCKET}/pipeline")
    try:
        ran = levers("run", "docs", cwd=root, timeout_s=600)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        keys = s3.keys("pipeline/")
        documents = {key.split("/")[1] for key in keys if "/source/" in key}
        assert len(documents) == len(list((root / "docs").iterdir()))
        for doc in documents:
            assert f"pipeline/{doc}/kg_ingest.json" in keys
        assert not (root / ".levers" / "artifacts").exists()  # nothing written locally ...
        assert not list((root / ".levers" / "downloads").glob("*/*"))  # ... beyond copies, all gone
        some = sorted(documents)[0]
        chunked = s3.client.get_object(Bucket=BUCKET, Key=f"pipeline/{some}/chunking.json")
        assert json.loads(chunked["Body"].read())["chunks"]
    finally:
        levers("down", cwd=root)


# Uses the store apart from forks, then forks as a supervisor does and uses it in the child.
FORKS_LATER = """
import os, sys
from pathlib import Path
from levers.documents.store import apart_from_forks, open_store

url, here = sys.argv[1], Path(sys.argv[2])
apart_from_forks(url, lambda: open_store(url, here, here).put_cached("forks", "ab12", "kept"))
child = os.fork()
if child == 0:
    os._exit(0 if open_store(url, here, here).cached("forks", "ab12") == "kept" else 1)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
"""


def test_a_process_that_used_the_store_apart_from_forks_can_fork(s3: S3, tmp_path: Path) -> None:
    """The object-store client's runtime does not survive a fork: a child forked after its
    parent made a call hangs on its own first call. Supervisors fork workers all their life."""
    script = [sys.executable, "-c", FORKS_LATER, f"s3://{BUCKET}/forks", str(tmp_path)]
    process = subprocess.Popen(script, start_new_session=True)
    try:
        assert process.wait(timeout=60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the forked child too, had it hung
        process.wait()


@pytest.mark.parametrize(
    ("store", "endpoint", "said"),
    [
        ("s3://no-such-bucket/p", None, "no such bucket or container (create it, or fix store:"),
        (f"s3://{BUCKET}/p", "http://127.0.0.1:9", "cannot reach http://127.0.0.1:9 (check the network"),
    ],
)
def test_a_store_that_cannot_be_written_is_one_line_and_records_nothing(
    s3: S3, tmp_path: Path, redis_url: str, store: str, endpoint: str | None, said: str
) -> None:
    root = make_project(tmp_path)
    (root / "pipeline.yaml").write_text(f"store: {store}\n" + (root / "pipeline.yaml").read_text())

    refused = levers("submit", "docs/doc0.txt", cwd=root, env={"AWS_ENDPOINT_URL": endpoint or s3.endpoint})

    assert refused.returncode == 1
    [line] = refused.stderr.splitlines()
    assert f"artifact store {store}: cannot write" in line and said in line
    assert "not-shown-anywhere" not in refused.stdout + refused.stderr
    # nothing was recorded: once the store works, the file is submitted, not skipped as a duplicate
    s3.client.create_bucket(Bucket="no-such-bucket")
    again = levers("submit", "docs/doc0.txt", cwd=root, env={"AWS_ENDPOINT_URL": s3.endpoint})
    assert again.returncode == 0 and "skipped" not in again.stdout, again.stdout + again.stderr


def test_refused_credentials_are_one_line_and_record_nothing(s3: S3, tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path)
    store = f"s3://{BUCKET}/p"
    (root / "pipeline.yaml").write_text(f"store: {store}\n" + (root / "pipeline.yaml").read_text())
    _moto_authenticates(s3, True)  # from now on, moto checks every request's key against its IAM
    try:
        refused = levers("submit", "docs/doc0.txt", cwd=root)
    finally:
        _moto_authenticates(s3, False)

    assert refused.returncode == 1, refused.stdout + refused.stderr
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"error: artifact store {store}: cannot write "), line
    assert "the credentials were refused" in line, line
    assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in line, line
    assert "not-shown-anywhere" not in refused.stdout + refused.stderr
    again = levers("submit", "docs/doc0.txt", cwd=root)
    assert again.returncode == 0 and "skipped" not in again.stdout, again.stdout + again.stderr


def _moto_authenticates(s3: S3, on: bool) -> None:
    """moto's own switch (its server's /moto-api/reset-auth): the number of requests it lets through
    before it authenticates them. It is global to the process the server runs in, so it is reset."""
    request = urllib.request.Request(
        f"{s3.endpoint}/moto-api/reset-auth",
        data=b"0" if on else b"inf",
        method="POST",
        headers={"Content-Type": "text/plain"},  # a form's body would be parsed away
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


SHARED = "s3://{bucket}/shared"


def shared_project(root: Path, files: dict[str, str]) -> Path:
    """The toy pipeline (same name, so the same queues) on the shared bucket, with its own files."""
    root.mkdir()
    make_project(root, docs=0)
    (root / "pipeline.yaml").write_text(
        f"store: {SHARED.format(bucket=BUCKET)}\n" + (root / "pipeline.yaml").read_text()
    )
    for name, text in files.items():
        (root / "docs" / name).write_text(text)
    return root


def workers_of(supervisor: subprocess.Popen[str]) -> set[int]:
    return {child.pid for child in psutil.Process(supervisor.pid).children(recursive=True)}


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_two_supervisors_in_two_directories_share_the_bucket_and_one_redis(
    s3: S3, tmp_path: Path, redis_url: str, connection: redis.Redis, start_levers: StartLevers
) -> None:
    # every write becomes a version of its own: "written twice" is two versions of one key
    s3.client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    here = shared_project(tmp_path / "here", {f"h{i}.txt": f"here {i} has some words" for i in range(4)})
    there = shared_project(tmp_path / "there", {f"t{i}.txt": f"there {i} has more words" for i in range(4)})
    (there / "docs" / "same.txt").write_text((here / "docs" / "h0.txt").read_text())

    # only `there` runs a supervisor: what `here` submits is done by its workers
    up_there = start_levers("up", cwd=there)
    from_here = submit(here, "docs")
    wait_until(lambda: all(doc_field(connection, d, "status") == "done" for d in from_here), timeout_s=120)
    assert {_output(s3, d, "first")["pid"] for d in from_here} <= workers_of(up_there)

    # both run; each drains what the other submitted
    up_here = start_levers("up", cwd=here)
    wait_until(lambda: workers_of(up_here), timeout_s=60)
    from_there = levers("submit", "docs", "--json", cwd=there)
    assert from_there.returncode == 0, from_there.stdout + from_there.stderr
    outcomes = json.loads(from_there.stdout)
    [known] = [o["doc_id"] for o in outcomes if o["skipped"]]
    assert known in from_here  # same.txt, the bytes of h0.txt: already submitted, not stored again
    ids = [o["doc_id"] for o in outcomes if not o["skipped"]]
    assert len(ids) == 4
    wait_until(lambda: all(doc_field(connection, d, "status") == "done" for d in ids), timeout_s=120)
    said = [stop(up) for up in (up_here, up_there)]  # both stop cleanly, their workers drained
    assert (up_here.returncode, up_there.returncode) == (0, 0), said

    versions = s3.client.list_object_versions(Bucket=BUCKET, Prefix="shared/").get("Versions", [])
    keys = [version["Key"] for version in versions]
    assert sorted(keys) == sorted(set(keys)), "a key was written twice"
    for doc in (*from_here, *ids):
        assert {f"shared/{doc}/first.json", f"shared/{doc}/second.json"} <= set(keys)
    assert {key.split("/")[1] for key in keys if "/source/" in key} == {*from_here, *ids}
    for root in (here, there):
        assert not (root / ".levers" / "artifacts").exists()


def _output(s3: S3, doc_id: str, phase: str) -> Any:
    stored = s3.client.get_object(Bucket=BUCKET, Key=f"shared/{doc_id}/{phase}.json")
    return json.loads(stored["Body"].read())
