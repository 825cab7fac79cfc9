"""Everything levers shows a person: tables, progress and one-line errors. The one place that prints.

Names, errors and outputs come from outside: every such text goes through ``safe.shown``, and rich
markup and emoji codes are off, so ``[red]`` or ``:x:`` in a name is shown as written.

Every command imports this module, so it imports levers' other modules only where a function needs
them: a read-only command loads what it reads and nothing more. JSON output (``print_json``) lives
in ``levers.cli.json_out``, which a command answering in JSON imports without this module.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from levers.cli.json_out import print_json
from levers.errors import LeversError, SpecError
from levers.safe import shown

if TYPE_CHECKING:
    from levers.documents.failures import FailedDocument, Retried
    from levers.documents.ledger import DocumentRecord
    from levers.documents.lookup import NameVersions
    from levers.documents.submission import Outcome
    from levers.observing.reports import SupervisorLease
    from levers.observing.status import PhaseStatus, PipelineStatus
    from levers.observing.versions import VersionStatus

# What DocStatus calls a document done or failed (levers.documents.ledger, not imported for them).
DONE, FAILED = "done", "failed"

# Piped output (CI logs, files) gets room for every column instead of the 80 a non-terminal implies.
PIPED_WIDTH = 160
# Text is shown as written: no markup, no :emoji: codes, no highlighting of what looks like numbers.
_LITERAL: dict[str, Any] = {"highlight": False, "markup": False, "emoji": False}
out = Console(**_LITERAL, width=None if sys.stdout.isatty() else PIPED_WIDTH)
err = Console(stderr=True, **_LITERAL, width=None if sys.stderr.isatty() else PIPED_WIDTH)


def error(exc: LeversError | str) -> None:
    """A failure as a red line on stderr, no traceback; one per problem of a pipeline file."""
    lines = [str(p) for p in exc.problems] if isinstance(exc, SpecError) else [str(exc)]
    for line in lines:
        err.print(Text.assemble(("error:", "red"), " ", shown(line)), soft_wrap=True)


def note(text: str) -> None:
    err.print(shown(text), soft_wrap=True)


def text_block(text: str) -> None:
    """Text of several lines on stdout (a pipeline's summary of its results)."""
    out.print(shown(text, keep_newlines=True), soft_wrap=True)


def outcomes(results: Sequence[Outcome], as_json: bool) -> None:
    """Ids on stdout, one per line; skips and errors on stderr, so ids pipe cleanly. On a
    terminal each id is followed by the path it came from, for a person to tell them apart."""
    if as_json:
        print_json([r.__dict__ | {"ok": r.ok} for r in results])
        return
    for result in results:
        explain(result)
        if result.doc_id:
            out.print(f"{result.doc_id}  {shown(result.source)}" if out.is_terminal else result.doc_id)


def explain(result: Outcome) -> None:
    """Why a submitted path was not queued as given, if it was not: its error, or why it was skipped."""
    if result.error:
        error(result.error)
    elif result.skipped and result.doc_id:
        note(f"{result.source}: already submitted as {result.doc_id} (use --force to run it again)")
    elif result.skipped:
        note(f"{result.source}: skipped, {result.reason}")
    elif result.version and result.version > 1:
        note(f"{result.source}: version {result.version} of this document (`levers show` lists them)")


class DocumentProgress:
    """A progress bar over documents until each is done or failed."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=err, transient=False,
        )  # fmt: skip
        self.task = self.progress.add_task("documents", total=total, detail="")

    def __enter__(self) -> DocumentProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, records: Sequence[DocumentRecord | None]) -> None:
        done = sum(1 for r in records if r and r.status == DONE)
        failed = sum(1 for r in records if r and r.status == FAILED)
        detail = f"[red]{failed} failed[/red]" if failed else ""
        self.progress.update(self.task, completed=done + failed, detail=detail)


def run_summary(
    records: Sequence[DocumentRecord], phases: Sequence[str], sources: dict[str, list[str]] | None = None
) -> None:
    """Per document (named by the paths it was given as, in ``sources`` by id) and per phase."""
    given = sources or {}

    def named(record: DocumentRecord) -> str:
        return ", ".join(given.get(record.id) or record.names or [record.name])

    table = Table(title="documents", title_justify="left")
    table.add_column("document")
    table.add_column("id")
    table.add_column("status")
    for phase in phases:
        table.add_column(f"{phase} s", justify="right")
    for record in records:
        cells = [_seconds(record.phases.get(p)) for p in phases]
        table.add_row(shown(named(record)), record.id[:12], _status(record.status), *cells)
    out.print(table)
    totals = Table(title="phases", title_justify="left")
    for column in ("phase", "documents", "reused", "mean s", "max s", "attempts"):
        totals.add_column(column, justify="left" if column == "phase" else "right")
    for phase in phases:
        runs = [r.phases[p] for r in records for p in [phase] if p in r.phases]
        # a reused result took no time of the phase's own: the times are those of the jobs that ran
        times = [run.seconds for run in runs if run.seconds is not None and not run.reused]
        reused = sum(run.reused for run in runs)
        mean = f"{sum(times) / len(times):.3f}" if times else "-"
        longest = f"{max(times):.3f}" if times else "-"
        totals.add_row(phase, str(len(times) + reused), str(reused), mean, longest,
                       str(sum(run.attempts for run in runs)))  # fmt: skip
    out.print(totals)
    for record in records:
        if record.status == FAILED:
            error(f"{named(record)} ({record.id[:12]}): {record.error}")


def failed_table(found: Sequence[FailedDocument]) -> None:
    """`levers failed`: one row per failed document, oldest failure first."""
    if not found:
        note("no failed document kept")
        return
    table = Table(title=f"{len(found)} failed", title_justify="left")
    for column in ("id", "names", "phase", "attempts", "error", "failed at"):
        table.add_column(column, justify="right" if column == "attempts" else "left")
    for failed in found:
        table.add_row(
            failed.id[:12], shown(", ".join(failed.names)), failed.phase, str(failed.attempts),
            shown(failed.error), _clock(failed.failed_at),
        )  # fmt: skip
    out.print(table)
    note("levers retry ID... (or --all) requeues them where they failed; levers show ID for the rest")


def retried(outcomes: Sequence[Retried]) -> None:
    """`levers retry`: one line per document, requeued or why not."""
    for outcome in outcomes:
        if outcome.error:
            error(outcome.error)
        else:
            names = ", ".join(outcome.names)
            out.print(shown(f"requeued {outcome.doc_id} ({names}) at {outcome.phase}"), soft_wrap=True)
    if not outcomes:
        note("no failed document to retry")


def _status(status: str) -> Text:
    return Text(status, style={"done": "green", "failed": "red"}.get(status, "yellow"))


def _seconds(run: Any) -> str:
    if run is not None and getattr(run, "reused", False):
        return "reused"
    return f"{run.seconds:.3f}" if run is not None and run.seconds is not None else "-"


def _queued(total: int, lanes: dict[str, int]) -> str:
    """The queued count, with the high and low lanes' parts when they hold any: "1003 (high 3, low 1000)"."""
    parts = [f"{lane} {lanes[lane]}" for lane in ("high", "low") if lanes.get(lane)]
    return f"{total} ({', '.join(parts)})" if parts else str(total)


def status_view(status: PipelineStatus, server: str | None = None) -> Group:
    """The status table, limits, the server's (masked) URL, and notes for a missing supervisor and
    a broken pipeline.yaml."""
    from levers.observing.status import FAILED_SHARE_WARNING, QUEUE_EMERGENCY, QUEUE_WARNING

    table = Table(title=f"pipeline {status.pipeline}", title_justify="left")
    columns = ("phase", "queued", "oldest", "running", "stranded", "retry", "done", "failed",
               "workers", "busy", "util", "docs/s", "p50 s", "p95 s", "sem", "thr", "state",
               "alerts")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("phase", "state", "alerts") else "right")
    for p in status.phases:
        queued_colour = (
            "red" if p.queued > QUEUE_EMERGENCY else "yellow" if p.queued > QUEUE_WARNING else "default"
        )
        failed_colour = "red" if p.failed_share > FAILED_SHARE_WARNING else "default"
        name = Text(f"{p.phase} ◀", style="bold red") if p.bottleneck else p.phase
        table.add_row(
            name, Text(_queued(p.queued, p.lanes), style=queued_colour), _duration(p.oldest_wait_s),
            f"{p.running}+{p.claimed_ahead}" if p.claimed_ahead else str(p.running),
            Text(str(p.stranded), style="red" if p.stranded else "default"), str(p.waiting_retry),
            str(p.done), Text(str(p.failed), style=failed_colour),
            f"{p.workers_alive}/{p.workers_desired}", str(p.workers_busy), f"{p.utilization:.0%}",
            f"{p.throughput:.3f}", _number(p.p50_s), _number(p.p95_s), str(p.semaphore), str(p.threads),
            p.state, "; ".join(p.alerts),
        )  # fmt: skip
    parts: list[Any] = [table]
    if any(p.bottleneck for p in status.phases):
        parts.append(Text("◀ the bottleneck: the longest backlog to drain, else the busiest phase"))
    if any(p.reused for p in status.phases):
        counts = ", ".join(f"{p.phase} {p.reused}" for p in status.phases if p.reused)
        parts.append(Text(f"reused (stored results taken, no handler run; not in done): {counts}"))
    if any(p.autoscale for p in status.phases):
        parts.append(_autoscale_table(status.phases))
    if status.limits:
        parts.append(_limits_table(status.limits))
    if server is not None:
        parts.append(Text(f"server: {server} (for rq info and rq-dashboard: levers url --show-password)"))
    return Group(*parts, *_supervision_lines(status))


def _supervision_lines(status: PipelineStatus) -> list[Any]:
    """Who supervises the pipeline, and what is wrong with it: lapsed leases, no supervisor,
    supervisors on different artifact stores, a broken pipeline.yaml."""
    parts: list[Any] = []
    if status.supervisors:
        parts.append(_supervisors_table(status.supervisors, status.versions))
    if status.versions is not None:
        parts += _version_lines(status.versions)
    if any(s.lapsed for s in status.supervisors):
        parts.append(
            Text("a lapsed lease's jobs go back to their queues once a live supervisor takes it over")
        )
    if not any(not s.lapsed for s in status.supervisors):
        parts.append(Text("no supervisor is running: start one with `levers up`", style="yellow"))
    if status.stores:
        stores = ", ".join(shown(store) for store in status.stores)
        warning = (
            f"the supervisors use {len(status.stores)} artifact stores ({stores}): a phase fails where "
            "the one before stored nothing; give every host one store:"
        )
        parts.append(Text(warning, style="red"))
    if status.config_error:
        parts.append(Text("pipeline.yaml has an error; workers keep the last good version:", style="red"))
        parts.append(Text(shown(status.config_error, keep_newlines=True), style="red"))
    return parts


def _supervisors_table(supervisors: Sequence[SupervisorLease], versions: VersionStatus | None) -> Table:
    table = Table(title="supervisors", title_justify="left")
    for column in ("host", "pid", "phases", "workers", "lease", "pipeline version"):
        table.add_column(column, justify="right" if column in ("pid", "workers") else "left")
    running = versions.supervisors if versions is not None else {}
    live = versions.live if versions is not None else None
    for s in supervisors:
        age = "-" if s.lease_age_s is None else _duration(s.lease_age_s)
        lease = Text(f"lapsed (renewed {age} ago)", style="red") if s.lapsed else f"renewed {age} ago"
        # host names, phases and versions come from Redis: shown as written
        # reports name a supervisor by host and pid, leases by an id of their own
        version = running.get(f"{s.host}:{s.pid}", s.version)
        drifted = live is not None and f"{s.host}:{s.pid}" in running and version != live
        table.add_row(
            shown(s.host), str(s.pid), shown(", ".join(s.phases)), str(s.workers), lease,
            Text(shown(version), style="yellow" if drifted else "default"),
        )  # fmt: skip
    return table


def _version_lines(versions: VersionStatus) -> list[Text]:
    """The live version, and every drift from it: a supervisor on another, a setting the local
    pipeline.yaml holds differently."""
    if versions.live is None:
        return [Text("pipeline version: none published yet (a supervisor publishes its file as it starts)")]
    lines = [Text(shown(f"pipeline version {versions.live}, published by {versions.published_by}"))]
    lines += [Text(shown(f"drift: {line}"), style="yellow") for line in versions.drift]
    if any(" in pipeline.yaml, " in line for line in versions.drift):
        lines.append(Text("this pipeline.yaml lacks changes the live version has: a `levers set` here "
                          "writes them into it with its own"))  # fmt: skip
    return lines


def _autoscale_table(phases: Sequence[PhaseStatus]) -> Table:
    table = Table(title="autoscale", title_justify="left")
    for column in ("phase", "desired", "min", "max", "needed", "reason"):
        table.add_column(column, justify="left" if column in ("phase", "reason") else "right")
    for p in phases:
        if p.autoscale is not None:
            scaled = p.autoscale
            table.add_row(
                p.phase, str(p.workers_desired), str(scaled.min), str(scaled.max), str(scaled.needed),
                shown(scaled.reason),  # host names come from Redis: shown as written
            )  # fmt: skip
    return table


def _limits_table(limits: Sequence[dict[str, Any]]) -> Table:
    """Declared figures with what the limit learned of its provider: ``2 of 6`` is an effective
    concurrency of 2 where 6 are declared."""
    table = Table(title="shared limits", title_justify="left")
    columns = ("limit", "in flight", "peak", "concurrency", "in window", "per window", "calls", "429s",
               "429s/min", "paused")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "limit" else "right")
    for limit in limits:
        rate = _learned(limit.get("effective_requests_per_minute"), limit["requests_per_minute"])
        paused = limit.get("paused_s") or 0
        table.add_row(
            shown(limit["name"]), str(limit["in_flight"]), str(limit["peak_in_flight"]),
            _learned(limit.get("effective_concurrency"), limit["concurrency"]), str(limit["calls_in_window"]),
            f"{rate} / {limit['window_seconds']:g} s", str(limit["calls"]), str(limit["rate_limited"]),
            str(limit.get("rate_limited_last_minute", 0)), f"{paused:.1f} s" if paused else "-",
        )  # fmt: skip
    return table


def _learned(effective: int | None, declared: int | None) -> str:
    if declared is None:
        return "-"
    return str(declared) if effective in (None, declared) else f"{effective} of {declared}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def findings(found: Sequence[Any]) -> None:
    """`levers advise`: each finding with its evidence and the command that acts on it."""
    if not found:
        all_clear = ": queues drain, workers are busy enough, nothing is rate limited"
        out.print(Text.assemble(("no finding", "green"), all_clear))
        return
    for finding in found:
        out.print(Text.assemble((finding.subject, "bold"), ": ", (finding.symptom, "yellow")))
        out.print(f"  evidence: {finding.evidence}")
        out.print(f"  action:   {finding.action}")
        if finding.command:
            out.print(Text.assemble("  ", (finding.command, "bold")))


def status_table(status: PipelineStatus, server: str | None = None) -> None:
    out.print(status_view(status, server))


def document_timeline(record: DocumentRecord, outputs: dict[str, Any]) -> None:
    if record.expired and not record.phases:
        out.print(f"{record.id}: done; its record expired (retention:) and the store holds no history")
        return
    if record.expired:
        out.print("its record expired from Redis (retention:); this history is the artifact store's")
    names = ", ".join(record.names or [record.name])
    out.print(Text.assemble((shown(names), "bold"), f"  {record.id}  ", _status(record.status)))
    if record.name not in record.names:
        out.print(shown(f"read as {record.name}: its content is not what its extension says"))
    if record.version:
        kept = ", older versions kept" if record.version.keep else ""
        out.print(shown(f"version {record.version.number} of {record.version.name}{kept}"))
    out.print(f"submitted {_clock(record.submitted)}" + (f", finished {_clock(record.finished)}"
              if record.finished else f", now at {record.phase}"))  # fmt: skip
    table = Table()
    for column in ("phase", "started", "seconds", "attempts", "error", "output"):
        table.add_column(column)
    for phase, run in record.phases.items():
        errors = [run.error, *([run.lost] if run.lost != run.error else [])]
        table.add_row(
            phase, _clock(run.started), _seconds(run), str(run.attempts),
            shown("; ".join(e for e in errors if e)), shown(_describe(outputs.get(phase))),
        )  # fmt: skip
    out.print(table)
    for phase, output in outputs.items():
        _time_spans(phase, output)
    if record.error:
        error(record.error)


def name_versions(view: NameVersions, as_json: bool) -> None:
    """The versions of a document name, oldest first."""
    if as_json:
        print_json({"name": view.name, "versions": [
            {"version": row.entry.number, "id": row.entry.id, "hash": row.entry.hash,
             "submitted": row.entry.submitted, "status": row.status, "keep_versions": row.entry.keep,
             "replaced_by": row.replaced_by}
            for row in view.versions
        ]})  # fmt: skip
        return
    out.print(Text(shown(view.name), "bold"))
    table = Table()
    for column in ("version", "id", "content sha256", "submitted", "status", "replaced"):
        table.add_column(column)
    for row in view.versions:
        kept = "-" if row.replaced_by is None else f"by version {row.replaced_by}"
        status = _status(row.status) if row.status else Text("no record", "dim")
        entry = row.entry
        table.add_row(str(entry.number), entry.id, entry.hash, _clock(entry.submitted), status, kept)
    out.print(table)


# Items with a time span listed per output (chunks of a recording); the stored output has them all.
SPANS_SHOWN = 30
SPAN_TEXT_CHARS = 70


def _time_spans(phase: str, output: Any) -> None:
    """The items of an output that carry ``start_s``, ``end_s`` and ``text`` (the chunks of a
    recording), each with where it is in the recording, so a reader can go and listen."""
    lists = output.values() if isinstance(output, dict) else []
    items = [
        item
        for value in lists
        if isinstance(value, list)
        for item in value
        if isinstance(item, dict)
        and isinstance(item.get("text"), str)
        and all(
            isinstance(item.get(key), (int, float)) and math.isfinite(item[key])
            for key in ("start_s", "end_s")
        )
    ]
    if not items:
        return
    out.print(shown(f"{phase}: {len(items)} in the recording"))
    for number, item in enumerate(items[:SPANS_SHOWN]):
        span = f"{_recording_time(item['start_s'])}-{_recording_time(item['end_s'])}"
        text = " ".join(item["text"].split())
        text = text if len(text) <= SPAN_TEXT_CHARS else text[: SPAN_TEXT_CHARS - 3] + "..."
        out.print(shown(f"  [{item.get('index', number)}] {span}  {text}"))
    if len(items) > SPANS_SHOWN:
        out.print(f"  ... and {len(items) - SPANS_SHOWN} more")


def _recording_time(seconds: float) -> str:
    """0:42.5, 12:03.0, 1:02:03.0: a time in a recording, to the tenth of a second."""
    hours, tenths = divmod(round(max(float(seconds), 0.0) * 10), 36_000)
    minutes, tenths = divmod(tenths, 600)
    second = f"{tenths // 10:02d}.{tenths % 10}"
    return f"{hours}:{minutes:02d}:{second}" if hours else f"{minutes}:{second}"


def _clock(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _describe(output: Any) -> str:
    """A phase output in a few words: scalar fields as they are, lists and texts by size, and
    mappings of figures (token usage, say) one level deep."""
    if not isinstance(output, dict):
        return "" if output is None else type(output).__name__
    parts = []
    for key, value in output.items():
        if isinstance(value, list):
            parts.append(f"{key}: {len(value)}")
        elif isinstance(value, str) and len(value) > 40:
            parts.append(f"{key}: {len(value)} chars")
        elif isinstance(value, (int, float, str, bool)):
            parts.append(f"{key}: {value}")
        elif isinstance(value, dict):
            figures = [f"{k} {v}" for k, v in value.items() if isinstance(v, (int, float)) and v]
            if figures:
                parts.append(f"{key}: {', '.join(figures)}")
    return "; ".join(parts)


def watch_status(
    read: Callable[[], PipelineStatus], server: str | None = None, refresh_s: float = 1.0
) -> None:
    """Redraw the status in place until Ctrl-C."""
    from rich.live import Live

    try:
        with Live(status_view(read(), server), console=out, refresh_per_second=4) as live:
            while True:
                time.sleep(refresh_s)
                live.update(status_view(read(), server))
    except KeyboardInterrupt:
        pass


def changes(applied_changes: Sequence[Any]) -> None:
    from levers.pipeline.dotted import setting_text
    from levers.server.masking import masked_values

    for change in applied_changes:
        old, new = (setting_text(masked_values(value)) for value in (change.old, change.new))
        out.print(shown(f"{change.dotted}: {old} -> {new}"), soft_wrap=True)


def applied(result: Any) -> None:
    """Whether running supervisors took up an edit (None: no server to ask)."""
    if result is None or result.supervisors == 0:
        note("no supervisor is running; the change applies when one starts")
        return
    for reason in result.refused:
        error(reason)
    if result.refused:
        refused = len(result.refused)
        note(f"{refused} of {result.supervisors} supervisor(s) refused it and run the version before")
    elif result.applied == result.supervisors:
        workers = ", ".join(f"{p} {alive}/{desired}" for p, (alive, desired) in result.workers.items())
        note(f"applied by {result.supervisors} supervisor(s); workers alive/desired: {workers}")
    else:
        note(f"written; {result.applied} of {result.supervisors} supervisor(s) have applied it so far")


# Longest text shown per graph result in a table; --json gives it whole.
GRAPH_TEXT_CHARS = 300


def graph_results(query: str, results: Sequence[dict[str, Any]], as_json: bool) -> None:
    """Knowledge-graph search results (facts and episodes, best first) as a table, or JSON."""
    if as_json:
        print_json(list(results))
        return
    if not results:
        note(f"nothing in the graph matches {query!r}")
        return
    table = Table(title=f"graph search: {shown(query)}", title_justify="left")
    for column in ("#", "kind", "name", "text"):
        table.add_column(column, justify="right" if column == "#" else "left")
    for rank, row in enumerate(results, 1):
        kind = str(row.get("kind", ""))
        text = " ".join(str(row.get("text") or "").split())
        if len(text) > GRAPH_TEXT_CHARS:
            text = text[: GRAPH_TEXT_CHARS - 1] + "…"
        style = "cyan" if kind == "fact" else "green"
        table.add_row(str(rank), Text(shown(kind), style=style), shown(row.get("name") or ""), shown(text))
    out.print(table)


def graph_counts(counts: dict[str, int], as_json: bool) -> None:
    if as_json:
        print_json(counts)
    else:
        out.print("  ".join(f"{key}: {value}" for key, value in counts.items()))
