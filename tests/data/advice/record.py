"""Record `levers status --json` of a real run in which one symptom of `levers advise` shows.

    python tests/data/advice/record.py NAME      (NAME: one of SCENARIOS; writes NAME.json here)

Each scenario is a one-phase pipeline in a temporary project, run by a real `levers up` on the
embedded server; phases that call a provider call the local stand-in Anthropic API
(tests/fake_anthropic.py) through the real SDK. Once the symptom shows in the live figures, the
status is saved. Run by hand: tests read the saved files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))  # tests/, for the stand-in API

from fake_anthropic import FakeAnthropic  # noqa: E402

PHASES = """
import asyncio, os, time
import anthropic

def _client(ctx):
    # max_retries=0: a 429 reaches the shared limit, which retries and counts it
    return anthropic.AsyncAnthropic(base_url=ctx.options["url"], api_key="recorded", max_retries=0)

async def _ask(client, text):
    await client.messages.create(model="claude-haiku-4-5", max_tokens=16,
                                 messages=[{"role": "user", "content": text}])

async def calls(doc, ctx):
    client = _client(ctx)
    await ctx.gather(*(_ask(client, f"part {i}") for i in range(ctx.options["calls"])))
    return {}

async def limited(doc, ctx):
    client = _client(ctx)
    limit = ctx.limit("anthropic")
    await ctx.gather(*(limit.call(_ask, client, f"part {i}") for i in range(ctx.options["calls"])))
    return {}

def burn(doc, ctx):
    until = time.process_time() + ctx.options["cpu_s"]
    while time.process_time() < until:
        pass
    return {}

def hold(doc, ctx):
    # the largest processes here: the kernel's out-of-memory killer takes these first
    with open("/proc/self/oom_score_adj", "w") as adj:
        adj.write("1000")
    held = b"\x01" * (ctx.options["hold_mb"] << 20)  # written through, so resident
    time.sleep(ctx.options["hold_s"])
    return {"held": len(held)}
"""


@dataclass(frozen=True)
class Scenario:
    handler: str
    levers: str
    options: dict[str, Any]
    documents: int
    latency_s: float = 0.0
    limits: str = ""
    fail_every_s: float = 0.0  # the stand-in refuses one request with 429 this often

    def ready(self, status: dict[str, Any]) -> bool:
        phase = status["phases"][0]
        if self.handler == "hold":
            return (status["memory_percent"] or 0) >= 90 and phase["rss_mb"] is not None
        if self.handler == "burn":
            return phase["done"] >= 4 and status["cpu_percent"] is not None
        if self.limits:
            return phase["done"] >= 10 and status["limits"][0]["rate_limited"] > 0
        return phase["done"] >= 10


SCENARIOS = {
    # 6 calls of 0.3 s one at a time: a job takes about 1.8 s where 0.3 s would do
    "sequential": Scenario("calls", "{workers: 2, semaphore: 1}", {"calls": 6}, 20, latency_s=0.3),
    # the same calls six at a time: nothing to advise
    "concurrent": Scenario("calls", "{workers: 2, semaphore: 6}", {"calls": 6}, 20, latency_s=0.3),
    # half a second of CPU per job, no calls: on a host whose cores are busy
    "cpu_bound": Scenario("burn", "{workers: 2, threads: 0}", {"cpu_s": 0.5}, 12),
    # a declared 600 a minute the provider does not allow: one request in ten answered 429
    "rate_limited": Scenario(
        "limited",
        "{workers: 2, semaphore: 4}",
        {"calls": 4},
        30,
        latency_s=0.05,
        limits="limits:\n  anthropic: {requests_per_minute: 600, concurrency: 8}\n",
        fail_every_s=0.6,
    ),
    # two workers holding most of the host's memory each
    "memory_pressure": Scenario("hold", "{workers: 2}", {"hold_s": 20}, 2),
}


def pipeline_yaml(scenario: Scenario, url: str) -> str:
    options = json.dumps({**scenario.options, "url": url})
    return (
        f"name: recorded\n{scenario.limits}phases:\n  work:\n"
        f"    handler: recorded_phases:{scenario.handler}\n    accepts: [.txt]\n"
        f"    levers: {scenario.levers}\n    options: {options}\n"
    )


def levers(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "levers", *args], cwd=root, capture_output=True, text=True, check=True
    )


def record(name: str) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    if scenario.handler == "hold":
        free_mb = _available_mb()
        # enough that the two workers bring the host to about 93 % used
        scenario.options["hold_mb"] = max(1, int((free_mb - _total_mb() * 0.07) / 2))
    with FakeAnthropic(latency_s=scenario.latency_s) as fake, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "recorded_phases.py").write_text(PHASES)
        (root / "pipeline.yaml").write_text(pipeline_yaml(scenario, fake.url))
        docs = root / "docs"
        docs.mkdir()
        for i in range(scenario.documents):
            (docs / f"doc{i}.txt").write_text(f"document {i}")
        refusing = threading.Event()
        if scenario.fail_every_s:
            threading.Thread(
                target=_refuse, args=(fake, scenario.fail_every_s, refusing), daemon=True
            ).start()
        up = subprocess.Popen([sys.executable, "-m", "levers", "up"], cwd=root, start_new_session=True)
        try:
            levers(root, "submit", "docs")
            return _wait_for(scenario, root)
        finally:
            refusing.set()
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(timeout=120)
            levers(root, "down")


def _wait_for(scenario: Scenario, root: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status: dict[str, Any] = json.loads(levers(root, "status", "--json").stdout)
        if scenario.ready(status):
            return status
        time.sleep(1)
    raise SystemExit("the symptom did not show within 5 minutes")


def _refuse(fake: FakeAnthropic, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        fake.fail_next(1, status=429, retry_after=0.1)


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise SystemExit(f"no {field} in /proc/meminfo")


def _available_mb() -> int:
    return _meminfo("MemAvailable")


def _total_mb() -> int:
    return _meminfo("MemTotal")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SCENARIOS:
        raise SystemExit(f"usage: record.py {{{','.join(SCENARIOS)}}}")
    status = record(sys.argv[1])
    (HERE / f"{sys.argv[1]}.json").write_text(json.dumps(status, indent=2) + "\n")
    print(f"{sys.argv[1]}.json: {json.dumps(status['phases'][0])}")
