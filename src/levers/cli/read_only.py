"""`levers status`, `show`, `get` and `plan`: what they do once their options are parsed, with
the defaults the Typer app declares.

Two parsers reach these functions: the Typer app, and the quick parser of ``levers.cli.entry``
that answers the common forms of these commands without building the app. Neither Typer nor any
module a command does not use is imported here, and each function imports what it reads when it
runs: a read-only command costs what it reads, not what the other commands need.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from levers.cli.json_out import print_json
from levers.errors import UsageError


def status(
    file: Path | None = None, as_json: bool = False, watch: bool = False, pipeline: str | None = None
) -> None:
    """Per phase: queued, running, done, failed, and workers alive/desired. Without a pipeline
    file, of the pipeline published on REDIS_URL (``pipeline`` names which, when several are)."""
    from levers.observing.status import PipelineStatus, pipeline_status
    from levers.pipeline.watching import PipelineWatcher
    from levers.server.project import open_anywhere

    project = open_anywhere(file, pipeline)
    # each refresh of --watch reads the file again: a `levers set` shows at the next one
    watcher = PipelineWatcher(project.loaded, error=project.file_error)

    def read() -> PipelineStatus:
        loaded = watcher.current()
        return pipeline_status(project.connection, loaded.outline, watcher.error, file=loaded)

    if as_json:
        print_json(read().as_json())
        return
    from levers.cli import console

    if watch:
        console.watch_status(read, project.target.masked)
    else:
        console.status_table(read(), project.target.masked)


def show(doc_id: str, file: Path | None = None, as_json: bool = False) -> None:
    """One document's timeline: each phase's start, time, attempts, errors and output; or the
    versions of a name: each one's id, content hash, when it came and its status."""
    from levers.documents.lookup import NameVersions, show_view

    view = show_view(file, doc_id)
    if isinstance(view, NameVersions):
        from levers.cli import console

        console.name_versions(view, as_json)
        return
    record, outputs = view
    if as_json:
        print_json({"document": record.__dict__, "outputs": outputs})
    else:
        from levers.cli import console

        console.document_timeline(record, outputs)


def get(key: str, file: Path | None = None, pipeline: str | None = None) -> None:
    """Print one setting's effective value (defaults included); without a pipeline file, the
    published version's on REDIS_URL."""
    from levers.pipeline.dotted import setting_text, value_at
    from levers.pipeline.loading import load_pipeline
    from levers.safe import shown
    from levers.server.masking import masked_values
    from levers.server.pipeline_file import pipeline_path, published_only

    url = published_only(file)
    if url is None:
        loaded = load_pipeline(pipeline_path(file))
    else:
        from levers.server.project import open_published

        loaded = open_published(url, pipeline).loaded
    value = masked_values(value_at(loaded.settings, key, loaded.path.name))
    if isinstance(value, (dict, list)):
        print_json(value)
    else:
        # as it is, for a script to read: never wrapped to a width
        sys.stdout.write(shown(setting_text(value), keep_newlines=True) + "\n")


def plan(
    file: Path | None = None,
    assignments: Sequence[str] = (),
    base: Path | None = None,
    burst: int | None = None,
    rate: str | None = None,
    fmt: str = "table",
    measured: bool = True,
    check: bool = False,
    as_json: bool = False,
) -> None:
    """Capacity per phase: throughput, bottleneck, latency, burst drain, CPU and RAM; what-ifs with --set."""
    from levers.planning.capacity import parse_rate
    from levers.planning.cells import PlanFormat
    from levers.planning.whatif import observe, plan_report
    from levers.server.pipeline_file import pipeline_path

    if fmt not in PlanFormat.__members__:
        raise UsageError(f"unknown format {fmt!r}", fix="use --format table or --format markdown")
    if check and not measured:
        raise UsageError("--check compares with measured figures", fix="leave out --no-measured")
    arrival = parse_rate(rate) if rate is not None else None
    path = pipeline_path(file)
    figures, hosts = observe(path, measured)
    report = plan_report(path, assignments, base, burst, arrival, figures, hosts, check)
    if as_json:
        print_json(report.as_json())
    else:
        from levers.cli import console
        from levers.planning.views import render

        # soft wrap: a markdown table row must stay one line, however wide the terminal
        console.out.print(render(report, PlanFormat(fmt)), soft_wrap=fmt == PlanFormat.markdown)
