"""What the benchmarks share: a private embedded server, the machine's description, statistics, and
what every `bin/bench NAME` does around its measurement (its options, its run header, its section)."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import cast

import psutil
import redis
from redis.utils import HIREDIS_AVAILABLE
from rq import Queue, Worker

from levers import keys
from levers.server.embedded import EmbeddedServer, valkey_binary

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RESULTS = ROOT / "bench" / "RESULTS.md"


@dataclass(frozen=True)
class Server:
    """A valkey server of its own for one benchmark run (levers' embedded server, same settings)."""

    url: str
    pid: int
    connection: redis.Redis


@contextlib.contextmanager
def embedded_server() -> Iterator[Server]:
    """Start levers' embedded valkey in a temporary directory; stop it and remove it after."""
    with tempfile.TemporaryDirectory(prefix="levers-bench-redis-") as tmp:
        server = EmbeddedServer(valkey_binary(), Path(tmp))
        running = server.ensure_running()
        connection = redis.Redis.from_url(running.url)
        try:
            yield Server(running.url, running.pid, connection)
        finally:
            connection.close()
            server.stop()


def bench_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark's child processes: the repository importable, quiet telemetry."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["GRAPHITI_TELEMETRY_ENABLED"] = "false"
    env.pop("LEVERS_FILE", None)
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def wait_for_idle_workers(url: str, queue: str, count: int, timeout_s: float, what: str) -> None:
    """Until ``count`` workers of RQ queue ``queue`` are up and idle."""
    with redis.Redis.from_url(url) as connection:
        served = Queue(queue, connection=connection)

        def ready() -> bool:
            return len([w for w in Worker.all(queue=served) if w.get_state() == "idle"]) >= count

        wait_until(ready, timeout_s, what)


def document_ids(connection: redis.Redis, pipeline: str) -> list[str]:
    """Every document the pipeline holds, once: a done one leaves the not-done set for the finished
    one (and may be read in both while it moves)."""
    members = [
        *cast(list[bytes], connection.zrange(keys.documents(pipeline), 0, -1)),
        *cast(list[bytes], connection.zrange(keys.finished(pipeline), 0, -1)),
    ]
    return list(dict.fromkeys(m.decode() for m in members))


def verdict(met: bool) -> str:
    return "met" if met else "not met"


def levers_cli(args: Sequence[str], cwd: Path, env: dict[str, str]) -> str:
    """`python -m levers ARGS` in ``cwd``: what it printed. A failure raises, except that of `levers
    down`: the clean-up after a run (of the graph's embedded server) must not hide how the run went."""
    done = subprocess.run([PYTHON, "-m", "levers", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0 and args[0] != "down":
        raise RuntimeError(f"levers {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM the process we started and wait; SIGKILL it if it does not stop in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """min-max of the repetitions, for the reader to judge the noise."""
    if not values:
        return "-"
    return f"{min(values):,.0f}-{max(values):,.0f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], numeric: bool = True) -> str:
    """A Markdown table (GitHub style), right-aligned except the first column (all left if not numeric)."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        rest = zip(row[1:], widths[1:], strict=True)
        parts = [row[0].ljust(widths[0]), *(c.rjust(w) if numeric else c.ljust(w) for c, w in rest)]
        return "| " + " | ".join(parts) + " |"

    tail = ["-" * (w + 1) + ":" if numeric else "-" * (w + 2) for w in widths[1:]]
    rule = "|" + "|".join(["-" * (widths[0] + 2), *tail]) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _valkey_version() -> str:
    result = subprocess.run([str(valkey_binary()), "--version"], capture_output=True, text=True, check=False)
    words = result.stdout.split()
    version = next((w for w in words if w.startswith("v=")), "v=?")
    return f"{words[0] if words else 'valkey'} {version[2:]}"


def machine() -> dict[str, str]:
    """The machine and software versions, for RESULTS.md."""
    load1, load5, _ = os.getloadavg()
    return {
        "CPU": f"{_cpu_model()} ({psutil.cpu_count(logical=True)} logical cores, "
        f"{psutil.cpu_count(logical=False) or '?'} physical)",
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "rq": _version("rq"),
        "redis-py": _version("redis") + (f" (hiredis {_version('hiredis')})" if HIREDIS_AVAILABLE else ""),
        "server": _valkey_version() + " (levers' embedded server, appendonly everysec)",
        "load average at start": f"{load1:.2f} (1 min), {load5:.2f} (5 min)",
    }


def replace_section(text: str, heading: str, section: str) -> str:
    """``text`` (RESULTS.md) with the section starting with ``heading`` replaced by ``section``,
    or ``section`` appended if it had none (for a benchmark run on its own)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def kept_section(path: Path, heading: str) -> str:
    """The section of ``path`` starting with ``heading``, for a full `bin/bench` run to keep ("" if
    none): benchmarks run on their own keep their last figures there."""
    if not path.exists():
        return ""
    text = path.read_text()
    start = text.find("\n" + heading)
    if start < 0:
        return ""
    end = text.find("\n## ", start + 1)
    return "\n" + text[start + 1 : end + 1 if end >= 0 else len(text)]


def results_text(output: Path) -> str:
    """RESULTS.md as it stands, or the heading of a new one: a section is replaced in it."""
    return output.read_text() if output.exists() else "# levers benchmarks: results\n"


def write_section(output: Path, heading: str, section: str) -> None:
    """Put ``section`` in place of the one starting with ``heading`` in ``output`` (RESULTS.md or
    --output), the other sections as they were; show it on stderr."""
    output.write_text(replace_section(results_text(output), heading, section))
    number = heading.removeprefix("## ").split(".", 1)[0]
    sys.stderr.write(f"{section}\nbench: section {number} written to {output}\n")


def git_state() -> str:
    """The revision the figures are of: HEAD, and whether src/ differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = [line for line in git("status", "--porcelain", "--", "src").splitlines() if line]
    if not dirty:
        return f"`{head}` (src/ clean)"
    return f"`{head}` + uncommitted changes to {len(dirty)} file(s) under src/ (others' work in progress)"


@dataclass(frozen=True)
class RunHeader:
    """What a section says of the run that wrote it, noted when the run starts: the command, the
    revision, the date, the machine and its load then. ``line()`` at the end adds the time taken
    and the load by then."""

    command: str
    source: str
    started: datetime
    machine: dict[str, str]
    began: float  # time.monotonic() at the start

    @classmethod
    def start(cls, argv: Sequence[str]) -> RunHeader:
        """``argv``: what followed `bin/bench` on the command line (the benchmark's name first)."""
        command = shlex.join(["bin/bench", *argv])
        return cls(command, git_state(), datetime.now().astimezone(), machine(), time.monotonic())

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.began

    @property
    def when(self) -> str:
        return self.started.strftime("%Y-%m-%d %H:%M %Z")

    def line(self) -> str:
        """`bin/bench NAME ...` at `abc1234` (src/ clean), 2026-12-02 03:05 UTC, 4.9 min, on CPU; load
        ... at start, ... at the end."""
        load1, load5, _ = os.getloadavg()
        return (
            f"`{self.command}` at {self.source}, {self.when}, {self.seconds / 60:.1f} min, "
            f"on {self.machine['CPU']}; load {self.machine['load average at start']} at start, "
            f"{load1:.2f} (1 min), {load5:.2f} (5 min) at the end."
        )


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least 1, not {text!r}")
    return value


def bench_parser(
    name: str, description: str | None, counts: Mapping[str, tuple[int, str]] | None = None, label: str = ""
) -> argparse.ArgumentParser:
    """`bin/bench NAME`'s parser: --output, ``counts`` (flag -> (default, what it counts): sizes and
    repetitions, each a positive number), and --label if ``label`` says what it names. The
    benchmark adds options of its own to it."""
    parser = argparse.ArgumentParser(prog=f"bin/bench {name}", description=description)
    for flag, (default, what) in (counts or {}).items():
        described = f"{what} (default {default})"
        parser.add_argument(flag, type=positive, default=default, metavar="N", help=described)
    if label:
        parser.add_argument("--label", default=None, metavar="TEXT", help=label)
    parser.add_argument(
        "--output", type=Path, default=RESULTS, metavar="FILE",
        help="the Markdown file whose section is written, the others kept (default bench/RESULTS.md)",
    )  # fmt: skip
    return parser
