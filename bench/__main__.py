"""``python -m bench [--quick] [--only NAME,...] [--output FILE]``: run the benchmarks, write RESULTS.md.

``python -m bench killstorm [--docs N] [--output FILE]``: the kill storm, in a section of its own.
``python -m bench outage [--quick] [--output FILE]``: Redis killed mid-run, in a section of its own.
``python -m bench broken [--reps N] [--output FILE]``: broken documents failing at once, in a section
of its own.
``python -m bench autoscale [--reps N] [--output FILE]``: autoscaling against fixed workers, in a
section of its own.
``python -m bench scale [--documents N] [--label NAME] [--output FILE]``: batches of documents into
a growing graph, in a section of its own.
``python -m bench lanes [--highs N] [--job-ms MS] [--workers N] [--output FILE]``: a high-priority
document's wait behind 1,000 low ones, in a section of its own.
``python -m bench footprint [--documents N] [--label TEXT] [--output FILE]``: Redis held per 1,000
finished documents, in a section of its own.
``python -m bench startup [--rounds N] [--compare SRC] [--output FILE]``: read-only commands' start-up
time against `rq info`, in a section of its own.
``python -m bench planning [--docs N] [--record DIR] [--output FILE]``: `levers plan` against a real
run, in a section of its own.
``python -m bench adaptive [--reps N] [--docs N] [--output FILE]``: a limit declared 3x too high
learning the provider's rate, in a section of its own.
``python -m bench store [--reps N] [--copies N] [--output FILE]``: documents/s with the artifact store
in S3 (moto's server) against the local store, in a section of its own.
``python -m bench batching [--documents N] [--rounds R] [--output FILE]``: small documents one at a
time against batches of 10, in a section of its own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import (
    adaptive,
    autoscale,
    batching,
    broken,
    efficiency,
    footprint,
    killstorm,
    lanes,
    memory,
    observability,
    outage,
    overhead,
    planning,
    scale,
    startup,
    store,
    takeover,
    transcription,
)
from bench.common import RESULTS, ROOT, RunHeader, embedded_server, kept_section, replace_section
from bench.report import RunInfo, render, src_fingerprint

BENCHMARKS = ("overhead", "efficiency", "memory", "observability", "transcription", "takeover")


@dataclass(frozen=True)
class Plan:
    """How much of each benchmark to run."""

    jobs: int
    overhead_reps: int
    profile_jobs: int
    workers: tuple[int, ...]
    semaphores: tuple[int, ...]
    efficiency_reps: int
    window_s: float
    min_docs: int
    max_docs: int
    rq_workers: tuple[int, ...]


FULL = Plan(
    jobs=1500, overhead_reps=4, profile_jobs=500,
    workers=(1, 2, 3, 4), semaphores=(1, 5, 10, 20), efficiency_reps=2, window_s=2.0,
    min_docs=40, max_docs=400, rq_workers=(3,),
)  # fmt: skip
QUICK = Plan(
    jobs=300, overhead_reps=2, profile_jobs=300,
    workers=(1, 2, 3, 4), semaphores=(1, 5, 10, 20), efficiency_reps=1, window_s=0.8,
    min_docs=12, max_docs=120, rq_workers=(3,),
)  # fmt: skip


# Benchmarks run on their own (`bin/bench NAME`), each writing its own section of RESULTS.md.
RUN_ALONE: dict[str, Callable[[list[str]], int]] = {
    "killstorm": killstorm.main,
    "outage": outage.main,
    "broken": broken.main,
    "autoscale": autoscale.main,
    "scale": scale.main,
    "lanes": lanes.main,
    "footprint": footprint.main,
    "startup": startup.main,
    "planning": planning.main,
    "adaptive": adaptive.main,
    "store": store.main,
    "batching": batching.main,
}


def _kept_alone(output: Path) -> str:
    """The sections of the benchmarks run on their own, as ``output`` holds them."""
    return "".join(
        kept_section(output, section)
        for section in (
            killstorm.SECTION,
            outage.SECTION,
            broken.SECTION,
            autoscale.SECTION,
            scale.SECTION,
            lanes.SECTION,
            footprint.SECTION,
            startup.SECTION,
            planning.SECTION,
            adaptive.SECTION,
            store.SECTION,
            batching.SECTION,
        )
    )


def progress(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    if argv[:1] and argv[0] in RUN_ALONE:
        return RUN_ALONE[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="bin/bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer jobs, documents and repetitions")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := set(only) - set(BENCHMARKS):
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    plan = QUICK if args.quick else FULL
    header = RunHeader.start(argv)
    fingerprint = src_fingerprint()
    progress(f"bench: {header.command} on {header.machine['CPU']}")
    result_overhead = result_efficiency = result_memory = result_observability = None
    section_transcription = section_takeover = None
    with embedded_server() as server:
        if "overhead" in only:
            progress("1. per-job overhead")
            result_overhead = overhead.run(
                server,
                plan.jobs,
                plan.overhead_reps,
                ("fork", "simple", "levers-bare", "levers"),
                plan.profile_jobs,
                progress,
            )
        if "efficiency" in only:
            progress("2. lever efficiency")
            result_efficiency = efficiency.run(
                server, plan.workers, plan.semaphores, plan.efficiency_reps, plan.window_s,
                plan.min_docs, plan.max_docs, plan.rq_workers, progress,
            )  # fmt: skip
        if "memory" in only:
            progress("3. memory")
            result_memory = memory.run(progress, server)
        if "observability" in only:
            progress("4. status with a deep queue, metrics per job")
            result_observability = observability.run(server, 2 if args.quick else 5)
        if "transcription" in only:
            progress("5. transcription under a provider's concurrency cap")
            plan_audio = transcription.QUICK if args.quick else transcription.FULL
            its_own = RunHeader.start(argv)
            section_transcription = transcription.render(
                transcription.run(server, plan_audio, progress), its_own.line()
            )
        if "takeover" in only:
            progress("7. a dead host's job running elsewhere")
            its_own = RunHeader.start(argv)
            section_takeover = takeover.render(
                takeover.run(server, 3 if args.quick else 5, progress), its_own.line()
            )
    load1, load5, _ = os.getloadavg()
    info = RunInfo(
        command=header.command,
        started=header.when,
        seconds=header.seconds,
        machine=header.machine,
        load_after=f"{load1:.2f} (1 min), {load5:.2f} (5 min)",
        quick=args.quick,
        src_changed=src_fingerprint() != fingerprint,
    )
    text = render(info, result_overhead, result_efficiency, result_memory)
    if result_observability is not None:
        text += "\n" + observability.render(result_observability)
    if section_transcription is not None:
        alone = only == ["transcription"]
        text = _with_section(text, transcription.SECTION, section_transcription, args.output, alone)
    if section_takeover is not None:
        text = _with_section(text, takeover.SECTION, section_takeover, args.output, only == ["takeover"])
    if only not in (["transcription"], ["takeover"]):  # those run alone already kept the rest of the file
        # run on their own; a full run keeps their last figures
        text += _kept_alone(args.output)
    args.output.write_text(text)
    shown = args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output
    progress(f"bench: wrote {shown} in {info.seconds / 60:.1f} min")
    return 0


def _with_section(text: str, heading: str, section: str, output: Path, alone: bool) -> str:
    """The report with a benchmark's section. Transcription and takeover measure a phase and a
    deployment, not levers' worker: run alone, each replaces its own section of the existing file
    and keeps the rest."""
    if alone and output.exists():
        return replace_section(output.read_text(), heading, section)
    return text + "\n" + section


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
