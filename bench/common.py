"""What the benchmarks share: a private embedded server, the machine's description, statistics."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil
import redis
from redis.utils import HIREDIS_AVAILABLE

from levers.server.embedded import EmbeddedServer, valkey_binary

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


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


def load_over_run(about: dict[str, str]) -> str:
    """The load average at the start (from ``machine()``) and now, for a section's run header."""
    load1, load5, _ = os.getloadavg()
    return f"{about['load average at start']} at start, {load1:.2f} (1 min), {load5:.2f} (5 min) at the end"


def results_text(output: Path) -> str:
    """RESULTS.md as it stands, or the heading of a new one: a section is replaced in it."""
    return output.read_text() if output.exists() else "# levers benchmarks: results\n"
