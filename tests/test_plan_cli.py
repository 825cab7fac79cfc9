"""`levers plan` from the command line: the seed's figures, what-ifs that leave the file alone, a diff
against a base file for a PR comment, and stable JSON."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from levers.cli.app import app
from tests.conftest import levers, make_project

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "examples" / "seed-pipeline.yaml"


def plan(*args: str) -> Result:
    return CliRunner().invoke(app, ["plan", *args])


def row(output: str, phase: str, nth: int = 0) -> str:
    """The ``nth`` table row of ``phase``: 0 in the phase table, 1 in the diff table."""
    first_cell = re.compile(rf"^[│|] \**{phase}\** *[│|]")
    lines = [line for line in output.splitlines() if first_cell.match(line)]
    return lines[nth]


@pytest.fixture
def seed_copy(tmp_path: Path) -> Path:
    target = tmp_path / "pipeline.yaml"
    shutil.copyfile(SEED, target)
    return target


def test_seed_figures_are_printed() -> None:
    result = plan("-f", str(SEED), "--burst", "100", "--rate", "10/hour")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for phase, docs_per_second, docs_per_hour in [
        ("extraction", "0.033", "120"), ("ingest_extract", "0.017", "60"),
        ("chunking", "0.33", "1200"), ("kg_ingest", "0.033", "120"),
    ]:  # fmt: skip
        cells = row(out, phase).split("│")
        assert docs_per_second in [c.strip() for c in cells], cells
        assert docs_per_hour in [c.strip() for c in cells], cells
    assert "3000 s (50 min)" in out  # 100 documents through extraction at 0.033 docs/s
    assert "159 s (2.6 min)" in out  # 90 + 9 + 60
    assert "4.1 vCPU" in out
    assert "2050 MB" in out
    assert "extraction = kg_ingest (tie)" in out
    assert "keeps up" in out and "falls behind" not in out


def test_ties_mark_every_bottleneck() -> None:
    out = plan("-f", str(SEED)).stdout
    assert "◀ bottleneck" in row(out, "extraction")
    assert "◀ bottleneck" in row(out, "kg_ingest")
    assert "◀ bottleneck" not in row(out, "chunking")


def test_what_if_leaves_the_file_byte_identical(seed_copy: Path) -> None:
    before = seed_copy.read_bytes()
    result = plan("-f", str(seed_copy), "--set", "extraction.workers=6", "--set", "chunking.semaphore=20")
    assert result.exit_code == 0, result.output
    assert seed_copy.read_bytes() == before
    assert "extraction.workers: 3 -> 6" in result.stdout
    assert "chunking.semaphore: 10 -> 20" in result.stdout
    assert "0.033 → 0.067" in row(result.stdout, "extraction", nth=1)  # the diff table's row
    assert "9 → 6" in result.stdout  # ceil(20/20) × 3 + 3
    assert "the bottleneck moved" in result.stdout


def test_what_if_shows_defaults_as_the_value_before(seed_copy: Path) -> None:
    result = plan("-f", str(seed_copy), "--set", "kg_ingest.threads=4", "--json")
    assert json.loads(result.stdout)["changes"] == [{"key": "kg_ingest.threads", "before": 0, "after": 4}]


@pytest.mark.parametrize(
    "assignment", ["extraction.workers=-1", "extraction.wrkers=2", "chunking.expect.calls=0"]
)
def test_an_invalid_what_if_is_one_line_and_exit_2(seed_copy: Path, assignment: str) -> None:
    before = seed_copy.read_bytes()
    result = plan("-f", str(seed_copy), "--set", assignment)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert seed_copy.read_bytes() == before


def test_a_missing_base_is_named_as_the_base(seed_copy: Path) -> None:
    result = plan("-f", str(seed_copy), "--base", str(seed_copy.parent / "nowhere.yaml"))
    assert result.exit_code == 2
    assert "--base" in result.stderr and "nowhere.yaml: no such file" in result.stderr
    assert "-f FILE" not in result.stderr  # the fix for the pipeline file, not for the base


def test_base_diff_in_markdown(seed_copy: Path) -> None:
    text = seed_copy.read_text()
    seed_copy.write_text(text.replace("workers: 3", "workers: 6", 1))  # extraction's, the first
    result = plan("-f", str(seed_copy), "--base", str(SEED), "--format", "markdown")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "| phase | workers | semaphore | job s | docs/s | change |" in out
    assert "| extraction | 3 → 6 | 1 | 90 | 0.033 → 0.067 | +100% |" in out
    assert "**The bottleneck moved.**" in out
    assert "path from extraction: bottleneck extraction = kg_ingest → kg_ingest" in out
    assert "CPU 4.1 → 5.6 vCPU; RAM 2050 → 2650 MB" in out
    assert "┃" not in out  # no rich box drawing in markdown


def test_base_diff_says_when_the_bottleneck_stays(seed_copy: Path) -> None:
    result = plan("-f", str(seed_copy), "--base", str(SEED), "--format", "markdown")
    assert "**The bottleneck did not move.**" in result.stdout


def test_markdown_rows_are_never_wrapped() -> None:
    out = plan("-f", str(SEED), "--burst", "100", "--rate", "10/hour", "--format", "markdown").stdout
    table_lines = [line for line in out.splitlines() if line.startswith("|")]
    assert table_lines and all(line.endswith("|") for line in table_lines)


def test_json_keys_are_stable(seed_copy: Path) -> None:
    plain = json.loads(plan("-f", str(seed_copy), "--json").stdout)
    compared = json.loads(plan("-f", str(seed_copy), "--set", "extraction.workers=6", "--json").stdout)
    top = {"file", "changes", "burst", "rate", "plan", "base", "base_label", "diff"} | {
        "window",
        "hosts",
        "check",
    }
    assert set(plain) == set(compared) == top
    assert plain["diff"] is None and compared["diff"]["moved"] is True
    assert plain["window"] is None and plain["check"] is None  # no Redis runs: nothing measured
    [host] = plain["hosts"]
    assert host["local"] is True and host["cores"] >= 1
    phase = plain["plan"]["phases"][0]
    assert set(phase) == {
        "phase", "workers", "semaphore", "threads", "job_seconds", "source", "docs_per_second",
        "docs_per_hour", "cpu", "ram_mb", "bottleneck_share", "bottleneck",
    }  # fmt: skip
    path = plain["plan"]["paths"][0]
    assert set(path) == {
        "entry", "phases", "bottleneck", "docs_per_second", "complete", "unknown", "stalled",
        "latency_seconds", "drain_seconds", "keeps_up",
    }  # fmt: skip
    assert plain["plan"]["totals"] == {
        "workers": 10, "cpu": 4.1, "ram_mb": 2050, "missing_cpu": [], "missing_ram": [],
    }  # fmt: skip


def test_json_carries_burst_and_rate() -> None:
    data = json.loads(plan("-f", str(SEED), "--burst", "100", "--rate", "10/hour", "--json").stdout)
    extraction = data["plan"]["paths"][0]
    assert extraction["drain_seconds"] == pytest.approx(3000)
    assert extraction["latency_seconds"] == 159
    assert extraction["keeps_up"] is True
    assert extraction["bottleneck"] == ["extraction", "kg_ingest"]


def test_a_pipeline_without_expect_says_unknown(tmp_path: Path) -> None:
    declared = (ROOT / "pipeline.yaml").read_text().splitlines(keepends=True)
    bare = tmp_path / "pipeline.yaml"
    bare.write_text("".join(line for line in declared if not line.lstrip().startswith("expect:")))
    result = plan("-f", str(bare), "--no-measured")
    assert result.exit_code == 0, result.output
    assert "unknown" in row(result.stdout, "extraction")
    assert "no job time for" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--rate", "10"], "cannot read the rate"), (["--format", "html"], "unknown format")],
)
def test_bad_options_exit_2(args: list[str], message: str) -> None:
    result = plan("-f", str(SEED), *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_an_alias_bomb_as_the_base_is_one_located_line_and_exit_2(seed_copy: Path) -> None:
    bomb = seed_copy.with_name("main.yaml")
    text = seed_copy.read_text() + "x0: &a0 [lol, lol, lol, lol, lol, lol]\n"
    for level in range(1, 12):
        text += f"x{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 6)}]\n"
    bomb.write_text(text)

    result = plan("-f", str(seed_copy), "--base", str(bomb))

    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert re.match(rf"error: {re.escape(str(bomb))}:\d+:\d+: alias \*a\d+ takes the file past", line), line


def test_check_without_a_server_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    project = make_project(tmp_path)
    result = plan("-f", str(project / "pipeline.yaml"), "--check")
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: pipeline.yaml: no job finished in the window (run the pipeline")
    assert plan("-f", str(project / "pipeline.yaml"), "--check", "--no-measured").exit_code == 2


@pytest.mark.e2e
def test_check_compares_the_plan_with_a_run(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path, workers=1, seconds=0.05, docs=4)
    assert levers("run", "docs", cwd=root).returncode == 0

    spec = str(root / "pipeline.yaml")
    data = json.loads(plan("-f", spec, "--check", "--json").stdout)
    checked = {row["phase"]: row for row in data["check"]}
    assert set(checked) == {"first", "second"}
    assert checked["first"]["arrival"] is True  # an entry phase does what was submitted
    assert checked["second"]["predicted"] == pytest.approx(checked["first"]["measured"])
    assert data["window"]["minutes"] == 15 and data["window"]["jobs"] == {"first": 4, "second": 4}
    [host] = data["hosts"]
    assert host["cores"] >= 1 and host["local"] is True

    shown = plan("-f", spec, "--check").stdout
    assert "measured: the last 15 min, weighted (half-life 5 min), 8 jobs" in shown
    assert "plan against what the pipeline did" in shown
    assert re.search(r"│ first +│ .* │ what was submitted", shown), shown
