"""Autoscaling with real processes: `levers up` grows a phase for a burst and shrinks it after."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tests.conftest import StartLevers, free_port, levers, scrape, submit, try_scrape, wait_until

# a job waits while the gate file exists, so the test sees the burst however slow the machine
PHASES = """
import os
import time

def work(doc, ctx):
    with open(ctx.options["log"], "a") as log:
        log.write(f"start {doc.id}\\n")
    while os.path.exists(ctx.options["gate"]):
        time.sleep(0.05)
    time.sleep(0.1)
    with open(ctx.options["log"], "a") as log:
        log.write(f"end {doc.id}\\n")
    return {"size": len(doc.read_bytes())}
"""

PIPELINE = """
name: scaled
phases:
  work:
    handler: scaledphases:work
    accepts: [.txt]
    levers: {{workers: 1}}
    autoscale: {{min: 1, max: 4, per_worker: 2, scale_down_after: 3}}
    options: {{log: "{log}", gate: "{gate}"}}
"""

DOCS = 40


def status(root: Path) -> dict[str, Any]:
    result = levers("status", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)["phases"][0]
    return found


def test_a_burst_scales_the_phase_up_and_back_to_min_without_stopping_a_job(
    tmp_path: Path, start_levers: StartLevers
) -> None:
    log = tmp_path / "jobs.log"
    (tmp_path / "scaledphases.py").write_text(PHASES)
    gate = tmp_path / "gate"
    gate.touch()
    (tmp_path / "pipeline.yaml").write_text(PIPELINE.format(log=log, gate=gate))
    (tmp_path / "docs").mkdir()
    for i in range(DOCS):
        (tmp_path / "docs" / f"doc{i}.txt").write_text(f"document {i}")
    port = free_port()
    start_levers("up", "--metrics-port", str(port), cwd=tmp_path)
    wait_until(lambda: try_scrape(port) and status(tmp_path)["workers_alive"] == 1, timeout_s=90)

    ids = submit(tmp_path, "docs")

    wait_until(lambda: status(tmp_path)["workers_busy"] == 4, timeout_s=90)
    during = status(tmp_path)
    assert during["autoscale"]["min"] == 1 and during["autoscale"]["max"] == 4
    assert during["autoscale"]["reason"].startswith("demand ")
    metrics = scrape(port)
    assert max(metrics["levers_workers_desired"].values()) >= 2
    assert "levers_workers_needed" in metrics
    shown = levers("status", cwd=tmp_path)
    assert "autoscale" in shown.stdout and "demand" in shown.stdout
    gate.unlink()

    wait_until(lambda: status(tmp_path)["done"] == DOCS, timeout_s=120)
    # both from one status: the report (desired) and RQ's registry (alive) are read apart
    wait_until(lambda: (s := status(tmp_path))["workers_alive"] == s["workers_desired"] == 1, timeout_s=60)

    after = status(tmp_path)
    assert "window" not in after["autoscale"]["reason"]
    # every job ran once, from start to end: no scale-down stopped one
    lines = Counter(log.read_text().split("\n"))
    assert all(lines[f"start {doc_id}"] == 1 and lines[f"end {doc_id}"] == 1 for doc_id in ids)
