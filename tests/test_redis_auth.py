"""A real password-protected server: levers works against it and never shows the password."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from levers.server.embedded import EmbeddedServer, valkey_binary
from tests.conftest import levers, make_project

PASSWORD = "s3cret-Pa55"


@pytest.fixture
def protected_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    server = EmbeddedServer(valkey_binary(), tmp_path_factory.mktemp("auth"), ["--requirepass", PASSWORD])
    yield server.ensure_running().port
    server.stop()


@pytest.mark.e2e
def test_run_with_a_password_never_prints_it(tmp_path: Path, protected_port: int) -> None:
    root = make_project(tmp_path, docs=2)
    url = f"redis://:{PASSWORD}@127.0.0.1:{protected_port}/0"

    result = levers("run", "docs", cwd=root, env={"REDIS_URL": url})
    status = levers("status", cwd=root, env={"REDIS_URL": url})

    assert result.returncode == 0, result.stderr
    assert status.returncode == 0
    logs = "".join(p.read_text() for p in (root / ".levers" / "logs").glob("*.log"))
    assert PASSWORD not in result.stdout + result.stderr + status.stdout + status.stderr + logs


def test_a_wrong_password_is_one_line(tmp_path: Path, protected_port: int) -> None:
    root = make_project(tmp_path, docs=1)
    url = f"redis://:wrong-{PASSWORD}@127.0.0.1:{protected_port}/0"

    result = levers("submit", "docs", cwd=root, env={"REDIS_URL": url})

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: Redis at redis://:***@127.0.0.1:{protected_port}/0 refused the credentials "
        "(check the password in the URL)"
    ]
