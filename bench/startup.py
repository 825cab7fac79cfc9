"""How fast read-only commands answer as fresh processes, side by side with RQ's own `rq info`.

On a private embedded server, a project of three phases with documents queued (no workers, so
nothing moves between runs): `levers status --json`, `get`, `show` and `plan --json` against
`rq info` on the same server, each a new process started through its console script as a user
starts it, in turns (one of each per round), wall time from start to exit. Figures are medians
over the rounds, and the ratio of `levers status --json` to `rq info` is the median of the
per-round ratios. Then `python -X importtime` of `levers status --json`: the modules it loads
that cost most, with their own imports (cumulative microseconds, one run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    PYTHON,
    RunHeader,
    bench_env,
    bench_parser,
    embedded_server,
    md_table,
    median,
    write_section,
)

SECTION = "## 14. Read-only commands: start-up time against `rq info`"
BIN = Path(sys.executable).parent
DOCUMENTS = 20
# Modules listed from the import-time trace: the most expensive top-level ones.
IMPORTS_SHOWN = 12

PIPELINE = """name: startup
phases:
  extraction:
    handler: startupphases:extraction
    accepts: [.txt]
    next: chunking
    levers: {workers: 1}
  chunking:
    handler: startupphases:chunking
    next: kg_ingest
    levers: {workers: 1}
  kg_ingest:
    handler: startupphases:kg_ingest
    levers: {workers: 1}
"""
HANDLERS = "def extraction(doc, ctx):\n    return {}\n\nchunking = kg_ingest = extraction\n"


@dataclass(frozen=True)
class Startup:
    rounds: int
    seconds: dict[str, list[float]]  # command label -> wall time per round
    imports: list[tuple[str, int]]  # (top-level module, cumulative us) of `levers status --json`

    def ratio(self, label: str, baseline: str = "rq info") -> float:
        pairs = zip(self.seconds[label], self.seconds[baseline], strict=True)
        return median([mine / theirs for mine, theirs in pairs])


def commands(url: str, doc_id: str) -> dict[str, list[str]]:
    return {
        "rq info": [str(BIN / "rq"), "info", "--url", url],
        "levers status --json": [str(BIN / "levers"), "status", "--json"],
        "levers get": [str(BIN / "levers"), "get", "phases.chunking.levers.semaphore"],
        "levers show": [str(BIN / "levers"), "show", doc_id[:10]],
        "levers plan --json": [str(BIN / "levers"), "plan", "--json"],
        "python -c pass": [PYTHON, "-c", "pass"],
    }


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)  # fmt: skip
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return took


def with_source(env: dict[str, str], source: Path | None) -> dict[str, str]:
    """``env`` with another checkout's ``src`` first on PYTHONPATH (None: as it is)."""
    if source is None:
        return env
    return {**env, "PYTHONPATH": os.pathsep.join([str(source), env.get("PYTHONPATH", "")])}


def import_costs(cwd: Path, env: dict[str, str]) -> list[tuple[str, int]]:
    """The top-level imports of `levers status --json` that cost most, cumulative microseconds."""
    done = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "levers", "status", "--json"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    costs = []
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
            costs.append((parts[2].strip(), int(parts[1])))
    return sorted(costs, key=lambda cost: -cost[1])[:IMPORTS_SHOWN]


def run(rounds: int, compare: Path | None) -> Startup:
    with embedded_server() as server, tempfile.TemporaryDirectory(prefix="levers-startup-") as tmp:
        root = Path(tmp)
        (root / "startupphases.py").write_text(HANDLERS)
        (root / "pipeline.yaml").write_text(PIPELINE)
        (root / "docs").mkdir()
        for i in range(DOCUMENTS):
            (root / "docs" / f"note-{i:03}.txt").write_text(f"note {i}: queued, never run\n")
        env = bench_env(REDIS_URL=server.url)
        # as installed: modules load from bytecode written once, not compiled again in every process
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        submitted = subprocess.run(
            [str(BIN / "levers"), "submit", "docs"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        argvs = {
            label: (argv, env, root)
            for label, argv in commands(server.url, submitted.stdout.split()[0]).items()
        }
        if compare is not None:
            # through `python -m levers`, as the other checkout's console script may differ: this
            # one's the same way, for a like-for-like pair
            module = [PYTHON, "-m", "levers", "status", "--json"]
            argvs["python -m levers status --json"] = (module, env, root)
            # in a copy of the project: each checkout keeps its own validated record of the file
            other = root / "compared"
            (other / ".levers").mkdir(parents=True)  # where a record is kept
            shutil.copy(root / "pipeline.yaml", other)
            shutil.copy(root / "startupphases.py", other)
            argvs[f"python -m levers status --json ({compare})"] = (module, with_source(env, compare), other)
        # once each first: files cached, bytecode compiled, pipeline.yaml validated and recorded
        for argv, argv_env, cwd in argvs.values():
            timed(argv, cwd, argv_env)
        seconds: dict[str, list[float]] = {label: [] for label in argvs}
        for _ in range(rounds):
            for label, (argv, argv_env, cwd) in argvs.items():
                seconds[label].append(timed(argv, cwd, argv_env))
        return Startup(rounds, seconds, import_costs(root, env))


def render(result: Startup, run_line: str) -> str:
    rows = [
        [label, f"{median(times) * 1000:.0f}", f"{min(times) * 1000:.0f}-{max(times) * 1000:.0f}",
         f"{result.ratio(label):.2f}"]
        for label, times in result.seconds.items()
    ]  # fmt: skip
    compared = (
        "\nThe `python -m levers` rows run the module, this checkout's and the compared one's (whose console"
        "\nscript may differ), for a like-for-like pair."
        if any(label.startswith("python -m levers status --json (") for label in result.seconds)
        else ""
    )
    imports = md_table(["module (imported by `levers status --json`)", "ms, with its imports"],
                       [[name, f"{us / 1000:.0f}"] for name, us in result.imports])  # fmt: skip
    return f"""{SECTION}

{run_line}

Each command a fresh process through its console script, against one embedded server holding
{DOCUMENTS} queued documents of a three-phase pipeline, in turns, {result.rounds} rounds: wall
time from start to exit, median and range; "x rq info": the median of the per-round ratios.{compared}

{md_table(["command", "ms (median)", "range", "x rq info"], rows)}

`levers status --json` is **{result.ratio("levers status --json"):.2f}x** `rq info` (target: at most 1).
Its most expensive imports, as `python -X importtime` counts them (one run, so a rough guide):

{imports}
"""


def main(argv: list[str]) -> int:
    parser = bench_parser("startup", __doc__, {"--rounds": (15, "runs of each command")})
    parser.add_argument(
        "--compare", type=Path, default=None,
        help="another checkout's src directory: its `python -m levers status --json` timed in the same "
        "rounds, beside this one's",
    )  # fmt: skip
    args = parser.parse_args(argv)
    header = RunHeader.start(["startup", *argv])
    result = run(args.rounds, args.compare)
    write_section(args.output, SECTION, render(result, header.line()))
    return 0
