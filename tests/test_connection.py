"""Which Redis a command uses (REDIS_URL > redis: > embedded), and that passwords never show."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from levers.errors import ConnectionFailed, UsageError
from levers.pipeline.loading import LoadedPipeline, parse_pipeline
from levers.server.connection import Target, configured_url, connect, expand_env, resolve
from levers.server.masking import masked
from tests.conftest import levers, make_project

PASSWORD = "s3cr3t-pw"


def pipeline_with(tmp_path: Path, redis_line: str | None) -> LoadedPipeline:
    """A minimal valid pipeline whose ``redis:`` line is ``redis_line`` (absent when None)."""
    text = "phases:\n  a:\n    handler: m:f\n    accepts: [pdf]\n"
    if redis_line is not None:
        text = f"{redis_line}\n{text}"
    return parse_pipeline(text.encode(), tmp_path / "pipeline.yaml")


# --- precedence ----------------------------------------------------------------------------------


def test_redis_url_in_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    loaded = pipeline_with(tmp_path, "redis: redis://from-file:6379/0")

    url = configured_url(loaded, environ={"REDIS_URL": "redis://from-env:6379/1"})

    assert url == "redis://from-env:6379/1"


def test_an_empty_redis_url_in_the_environment_falls_back_to_the_file(tmp_path: Path) -> None:
    loaded = pipeline_with(tmp_path, "redis: redis://from-file:6379/0")

    assert configured_url(loaded, environ={"REDIS_URL": ""}) == "redis://from-file:6379/0"


def test_the_file_url_is_used_when_the_environment_names_none(tmp_path: Path) -> None:
    loaded = pipeline_with(tmp_path, "redis: rediss://cache.example:6380/2")

    assert configured_url(loaded, environ={}) == "rediss://cache.example:6380/2"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "redis://localhost:6379/0"),
        ({"LEVERS_REDIS": ""}, "redis://localhost:6379/0"),
        ({"LEVERS_REDIS": "redis://other:7000/3"}, "redis://other:7000/3"),
    ],
)
def test_a_variable_with_a_default_expands_to_its_value_or_the_default(
    tmp_path: Path, environ: dict[str, str], expected: str
) -> None:
    loaded = pipeline_with(tmp_path, "redis: ${LEVERS_REDIS:-redis://localhost:6379/0}")

    assert configured_url(loaded, environ=environ) == expected


def test_variables_expand_inside_a_url(tmp_path: Path) -> None:
    loaded = pipeline_with(tmp_path, "redis: redis://${REDIS_HOST}:${REDIS_PORT:-6379}/0")

    assert configured_url(loaded, environ={"REDIS_HOST": "db.internal"}) == "redis://db.internal:6379/0"


def test_an_unset_variable_without_a_default_names_the_variable(tmp_path: Path) -> None:
    loaded = pipeline_with(tmp_path, "redis: redis://${REDIS_HOST}:6379/0")

    with pytest.raises(UsageError) as caught:
        configured_url(loaded, environ={"OTHER": "x"})

    assert caught.value.message == "redis: ${REDIS_HOST} is not set"
    assert "REDIS_HOST" in caught.value.fix


@pytest.mark.parametrize("redis_line", [None, "redis:", "redis: ''", "redis: ${LEVERS_REDIS:-}"])
def test_no_url_anywhere_means_the_embedded_server(tmp_path: Path, redis_line: str | None) -> None:
    loaded = pipeline_with(tmp_path, redis_line)

    assert configured_url(loaded, environ={}) is None


def test_resolve_with_a_configured_url_uses_it_without_an_embedded_server(tmp_path: Path) -> None:
    loaded = pipeline_with(tmp_path, None)

    target = resolve(loaded, environ={"REDIS_URL": f"redis://:{PASSWORD}@db:6379/0"})

    assert target == Target(url=f"redis://:{PASSWORD}@db:6379/0", embedded=False)
    assert not (tmp_path / ".levers").exists()


def test_expand_env_leaves_text_without_references_alone() -> None:
    assert expand_env("redis://plain:6379/0", environ={}) == "redis://plain:6379/0"


# --- schemes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h:6380/0", "unix:///tmp/redis.sock"])
def test_supported_schemes_are_accepted(tmp_path: Path, url: str) -> None:
    assert configured_url(pipeline_with(tmp_path, None), environ={"REDIS_URL": url}) == url


def test_an_unsupported_scheme_is_a_usage_error_that_hides_the_password(tmp_path: Path) -> None:
    loaded = pipeline_with(tmp_path, None)

    with pytest.raises(UsageError) as caught:
        configured_url(loaded, environ={"REDIS_URL": f"http://admin:{PASSWORD}@db:6379/0"})

    assert "http://admin:***@db:6379/0" in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert "redis://" in caught.value.fix


# --- masking -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://alice:{PASSWORD}@db:6379/0", "redis://alice:***@db:6379/0"),
        (f"rediss://alice:{PASSWORD}@db:6380/1", "rediss://alice:***@db:6380/1"),
        (f"redis://:{PASSWORD}@db:6379/0", "redis://:***@db:6379/0"),
        (f"rediss://:{PASSWORD}@db/0", "rediss://:***@db/0"),
        (
            f"redis://alice:{PASSWORD}@db:6379/0?ssl_cert_reqs=none",
            "redis://alice:***@db:6379/0?ssl_cert_reqs=none",
        ),
    ],
)
def test_masked_hides_the_password(url: str, shown: str) -> None:
    assert masked(url) == shown
    assert Target(url=url, embedded=False).masked == shown


@pytest.mark.parametrize(
    "url",
    ["redis://db:6379/0", "rediss://alice@db:6380/0", "unix:///tmp/redis.sock", "redis://127.0.0.1:6379"],
)
def test_masked_leaves_a_url_without_a_password_alone(url: str) -> None:
    assert masked(url) == url


def test_masked_keeps_an_ipv6_host_bracketed() -> None:
    assert masked(f"redis://alice:{PASSWORD}@[::1]:6379/0") == "redis://alice:***@[::1]:6379/0"


# --- connecting ----------------------------------------------------------------------------------


def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound by the OS, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_connecting_to_a_server_that_does_not_answer_fails_with_the_masked_url() -> None:
    port = unused_port()
    target = Target(url=f"redis://alice:{PASSWORD}@127.0.0.1:{port}/0", embedded=False)

    with pytest.raises(ConnectionFailed) as caught:
        connect(target)

    error = caught.value
    assert error.message.startswith(f"cannot reach Redis at redis://alice:***@127.0.0.1:{port}/0: ")
    assert PASSWORD not in str(error)
    assert PASSWORD not in repr(error.args)
    assert "REDIS_URL" in error.fix


# --- malformed URLs ------------------------------------------------------------------------------


MALFORMED = [
    ("redis://host:notaport", "Port could not be cast to integer value as 'notaport'"),
    (f"redis://:{PASSWORD}@host:99999/0", "Port out of range"),
    (f"redis://:{PASSWORD}@[::1", "Invalid IPv6 URL"),
    ("redis://host/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
    (f"redis://:{PASSWORD}@host/0?no_such_option=1", "unknown option 'no_such_option'"),
    ("rediss://host/0?ssl_cert_reqs=bogus", "Invalid SSL Certificate Requirements Flag"),
    ("redis://host/notadb", "the database must be a number, not 'notadb'"),
    ("unix://", "unix:// needs the socket's path"),
]


@pytest.mark.parametrize(("url", "reason"), MALFORMED)
def test_a_malformed_redis_url_is_one_line_naming_the_variable(tmp_path: Path, url: str, reason: str) -> None:
    root = make_project(tmp_path, docs=1)

    result = levers("submit", "docs", cwd=root, env={"REDIS_URL": url})

    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: REDIS_URL: '{masked(url)}' is not a Redis URL: ")
    assert reason in line and "redis://[:PASSWORD@]HOST" in line
    assert PASSWORD not in result.stdout + result.stderr


def test_a_malformed_url_in_the_pipeline_file_names_the_key(tmp_path: Path) -> None:
    root = make_project(tmp_path, docs=1)
    pipeline = root / "pipeline.yaml"
    pipeline.write_text(f"redis: redis://:{PASSWORD}@host:notaport/0\n" + pipeline.read_text())

    result = levers("status", cwd=root, env={"REDIS_URL": ""})

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: redis: in pipeline.yaml: 'redis://:***@host:notaport/0' is not a Redis URL: Port could not "
        "be cast to integer value as 'notaport' (write redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... "
        "for TLS, or unix:///PATH)"
    ]


def test_masked_hides_the_password_of_a_url_too_malformed_to_parse() -> None:
    assert masked(f"redis://alice:{PASSWORD}@[::1") == "redis://alice:***@[::1"
