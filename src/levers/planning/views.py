"""How `levers plan` looks: rich tables and bars for a terminal, GitHub markdown for a PR comment.

Both formats are built from the same rows of text (``*_rows``), so they cannot disagree. This
module builds renderables and strings only; console.py's ``out`` prints them.

Ties: every phase within capacity.TIE_TOLERANCE of its path's lowest capacity is a bottleneck,
so a tie marks all of them (the seed's extraction and kg_ingest, both 0.033 docs/s) and the path
names them joined by " = ".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from levers.planning.capacity import PathPlan, PhaseChange, Plan, PlanDiff, Rate, drain_seconds, keeps_up
from levers.planning.cells import BAR_WIDTH, PlanFormat, bar, duration, num, opt, percent, secs, sig
from levers.planning.whatif import PlanReport

MARK = "◀ bottleneck"
LEGEND = (
    "docs/s = workers / job s. bottleneck share: how busy a phase is while its path runs at its "
    "bottleneck's pace. Tied phases are all marked."
)

Rows = list[list[str]]


def render(report: PlanReport, fmt: PlanFormat = PlanFormat.table) -> RenderableType:
    if fmt is PlanFormat.markdown:
        # print it with soft_wrap=True: a markdown table row must stay on one line
        return Text(markdown(report))
    return rich_view(report)


# ---- rows shared by both formats ------------------------------------------------------------


def phase_rows(plan: Plan) -> tuple[list[str], Rows]:
    headers = ["phase", "workers", "semaphore", "job s", "CPU s", "from", "docs/s", "docs/hour", "cpu",
               "ram MB", "bottleneck share", ""]  # fmt: skip
    rows = []
    for p in plan.phases.values():
        share = plan.share(p.name)
        cpu_s = (
            "-"
            if p.cpu_job_seconds is None
            else secs(p.cpu_job_seconds) + (" (cores)" if p.cpu_bound else "")
        )
        rows.append([
            p.name, str(p.workers), str(p.semaphore), opt(p.job_seconds, secs), cpu_s, p.source,
            opt(p.docs_per_second, sig), opt(p.docs_per_hour, sig), opt(p.cpu, num),
            opt(p.ram_mb, num), opt(share, percent), MARK if p.name in plan.path_bottlenecks else "",
        ])  # fmt: skip
    return headers, rows


def path_rows(plan: Plan, burst: int | None, rate: Rate | None) -> tuple[list[str], Rows]:
    headers = ["path", "bottleneck", "docs/s", "latency of 1 doc"]
    headers += [f"{burst} docs drain in"] if burst is not None else []
    headers += [f"{rate.text} = {sig(rate.per_second)}/s"] if rate is not None else []
    rows = []
    for path in plan.paths:
        row = [" → ".join(path.phases), _bottleneck(path), _throughput(path), _latency(path)]
        if burst is not None:
            row.append(_drain(path, burst))
        if rate is not None:
            row.append(_verdict(path, rate))
        rows.append(row)
    return headers, rows


def totals_line(plan: Plan) -> str:
    """Workers, vCPU and RAM; phases without ``resources:`` are named, not counted as zero."""
    totals = plan.totals()
    missing = [name for name in plan.phases if name in {*totals.missing_cpu, *totals.missing_ram}]
    if missing and len(missing) == len([p for p in plan.phases.values() if p.workers > 0]):
        return f"{totals.workers} workers; CPU and RAM unknown: no phase with workers declares resources:"
    line = (f"{totals.workers} workers need {num(totals.cpu)} vCPU and {num(totals.ram_mb)} MB RAM "
            f"({totals.ram_mb / 1024:.1f} GB)")  # fmt: skip
    return line + (f", not counting {', '.join(missing)} (no resources: given)" if missing else "")


def bar_rows(plan: Plan) -> Rows:
    """[phase, bar, docs/hour, mark]: bars scale linearly to the fastest phase."""
    known = [p.docs_per_second for p in plan.phases.values() if p.docs_per_second is not None]
    top = max(known, default=0.0)
    rows = []
    for p in plan.phases.values():
        rate = p.docs_per_second
        label = "unknown" if rate is None else f"{sig(p.docs_per_hour or 0.0)}/h"
        drawn = bar(rate / top if rate is not None and top > 0 else 0.0)
        rows.append([p.name, drawn, label, MARK if p.name in plan.path_bottlenecks else ""])
    return rows


def diff_rows(diff: PlanDiff) -> tuple[list[str], Rows]:
    headers = ["phase", "workers", "semaphore", "job s", "docs/s", "change"]
    rows = []
    for c in diff.phases:
        before = getattr(c.before, "docs_per_second", None)
        after = getattr(c.after, "docs_per_second", None)
        change = c.status if c.status in ("added", "removed") else _change(before, after)
        cells = [_pair(c, "workers", str), _pair(c, "semaphore", str), _pair(c, "job_seconds", secs)]
        rows.append([c.name, *cells, _pair(c, "docs_per_second", sig), change])
    return headers, rows


def diff_lines(diff: PlanDiff) -> list[str]:
    """Whether the bottleneck moved (first line), then where, latency, CPU and RAM before -> after."""
    lines = [
        "the bottleneck moved" if diff.moved else "the bottleneck did not move",
        f"slowest phase of the pipeline: {_moved(diff.before.bottleneck, diff.after.bottleneck)}",
    ]
    for c in diff.paths:
        old = c.before.limited_by if c.before else ()
        new = c.after.limited_by if c.after else ()
        latency = _moved([_path_latency(c.before)], [_path_latency(c.after)])
        lines.append(f"path from {c.entry}: bottleneck {_moved(old, new)}; latency {latency}")
    old_t, new_t = diff.before.totals(), diff.after.totals()
    lines.append(f"CPU {_moved([num(old_t.cpu)], [num(new_t.cpu)])} vCPU; "
                 f"RAM {_moved([num(old_t.ram_mb)], [num(new_t.ram_mb)])} MB; "
                 f"workers {_moved([str(old_t.workers)], [str(new_t.workers)])}")  # fmt: skip
    lines += [f"{c.name}: the semaphore changed but not the job time; expect.calls would model it"
              for c in diff.phases if _semaphore_ignored(c)]  # fmt: skip
    lines += [_no_gain(diff, c) for c in diff.phases if _more_workers_held_back(diff, c)]
    return lines


def _more_workers_held_back(diff: PlanDiff, change: PhaseChange) -> bool:
    """More workers for a phase that its hosts' cores hold back, alone or with the path's phases."""
    b, a = change.before, change.after
    if b is None or a is None or a.workers <= b.workers:
        return False
    return a.cpu_bound or any(change.name in p.phases and p.cpu_host for p in diff.after.paths)


def _no_gain(diff: PlanDiff, change: PhaseChange) -> str:
    after = change.after
    assert after is not None and after.cpu_job_seconds is not None
    hosts = ", ".join(f"{h.name} has {h.describe_cores()}" for h in diff.after.hosts)
    return (f"{change.name}: more workers add little or nothing: its jobs cost "
            f"{secs(after.cpu_job_seconds)} s of CPU each and the cores are all used ({hosts})")  # fmt: skip


def _moved(before: Sequence[str], after: Sequence[str]) -> str:
    if list(before) == list(after):
        return f"{_names(after)} (unchanged)"
    return f"{_names(before)} → {_names(after)}"


def _semaphore_ignored(change: PhaseChange) -> bool:
    """A what-if on the semaphore of a phase whose job time is fixed (expect.seconds or measured)."""
    b, a = change.before, change.after
    return b is not None and a is not None and b.semaphore != a.semaphore and b.job_seconds == a.job_seconds


# ---- terminal ----------------------------------------------------------------------------------


def rich_view(report: PlanReport) -> Group:
    plan = report.plan
    parts: list[RenderableType] = [Text(_title(report), style="bold")]
    parts += [Text(f"{c.key}: {c.before} -> {c.after}") for c in report.changes]
    parts += [Text(line, style="dim") for line in context_lines(report)]
    parts.append(_rich_table(*phase_rows(plan), marked=plan.path_bottlenecks))
    parts.append(Text(LEGEND, style="dim"))
    parts.append(Text("capacity, docs/hour", style="bold"))
    parts.append(_rich_bars(bar_rows(plan)))
    parts.append(_rich_table(*path_rows(plan, report.burst, report.rate)))
    parts.append(Text(totals_line(plan)))
    parts += [Text(f"warning: {w}", style="yellow") for w in plan.warnings()]
    diff = report.diff
    if diff is not None:
        parts.append(Text(f"\ncompared with {report.base_label}", style="bold"))
        parts.append(_rich_table(*diff_rows(diff)))
        first, *rest = diff_lines(diff)
        parts += [Text(first, style="bold yellow" if diff.moved else "bold"), *(Text(line) for line in rest)]
    if report.checked is not None:
        parts.append(
            Text("\nplan against what the pipeline did, as written, over the same window", style="bold")
        )
        parts.append(_rich_table(*check_rows(report)))
    return Group(*parts)


def _rich_table(headers: Sequence[str], rows: Rows, marked: frozenset[str] = frozenset()) -> Table:
    table = Table(title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 or not rows or not _numeric(rows, i) else "right")
    for row in rows:
        table.add_row(*row, style="bold red" if row[0] in marked else None)
    return table


def _rich_bars(rows: Rows) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column()
    grid.add_column()
    grid.add_column(justify="right")
    grid.add_column(style="bold red")
    for name, drawn, label, mark in rows:
        grid.add_row(name, Text(drawn.ljust(BAR_WIDTH), style="red" if mark else "green"), label, mark)
    return grid


# ---- markdown ----------------------------------------------------------------------------------


def markdown(report: PlanReport) -> str:
    plan = report.plan
    out = [f"### {_title(report)}", ""]
    out += [f"- `{c.key}`: {c.before} → {c.after}" for c in report.changes] + ([""] if report.changes else [])
    out += [f"_{line}_" for line in context_lines(report)] + ([""] if context_lines(report) else [])
    out += _md_table(*phase_rows(plan), marked=plan.path_bottlenecks)
    out += ["", f"_{LEGEND}_", "", "Capacity, docs/hour:", ""]
    out += ["```text", *(_bar_line(row) for row in bar_rows(plan)), "```", ""]
    out += _md_table(*path_rows(plan, report.burst, report.rate))
    out += ["", totals_line(plan)]
    out += [f"> **warning:** {w}" for w in plan.warnings()]
    diff = report.diff
    if diff is not None:
        out += ["", f"#### Compared with {report.base_label}", ""]
        out += _md_table(*diff_rows(diff))
        first, *rest = diff_lines(diff)
        out += ["", f"**{first[0].upper()}{first[1:]}.**", "", *(f"- {line}" for line in rest)]
    if report.checked is not None:
        out += ["", "#### Plan against what the pipeline did, as written, over the same window", ""]
        out += _md_table(*check_rows(report))
    return "\n".join(out) + "\n"


def _md_table(headers: Sequence[str], rows: Rows, marked: frozenset[str] = frozenset()) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    aligns = ["---" if i == 0 or not _numeric(rows, i) else "---:" for i in range(len(headers))]
    body = [line([f"**{r[0]}**" if r[0] in marked else r[0], *r[1:]]) for r in rows]
    return [line(headers), line(aligns), *body]


def _bar_line(row: list[str]) -> str:
    name, drawn, label, mark = row
    return f"{name:<16} {drawn.ljust(BAR_WIDTH)} {label:>9} {mark}".rstrip()


# ---- cells ----------------------------------------------------------------------------------


def context_lines(report: PlanReport) -> list[str]:
    """Where the figures come from: the window of measured ones, and the hosts."""
    lines = []
    if report.measured is not None and report.measured.phases:
        jobs = sum(f.jobs for f in report.measured.phases.values())
        lines.append(f"measured: {report.measured.window.describe()}, {jobs} jobs")
    hosts = report.plan.hosts
    if hosts:
        source = (
            "the local machine" if all(h.local and h.workers is None for h in hosts) else "supervisor reports"
        )
        each = [f"{h.name} {h.cores:g} cores" + (f", {h.memory_mb / 1024:.1f} GB" if h.memory_mb else "")
                + (f", {h.others:.1f} busy with other programs" if h.others else "")
                for h in hosts]  # fmt: skip
        lines.append(f"hosts ({source}): {'; '.join(each)}")
    return lines


def check_rows(report: PlanReport) -> tuple[list[str], Rows]:
    headers = ["phase", "plan docs/s", "measured docs/s", "error", ""]
    rows = []
    for c in report.checked or ():
        error = "-" if c.error is None else f"{c.error:+.0%}"
        note = "busy: its capacity" if c.loaded else "what was submitted" if c.arrival else "what reached it"
        rows.append([c.phase, opt(c.predicted, sig), opt(c.measured, sig), error, note])
    return headers, rows


def _title(report: PlanReport) -> str:
    what_if = " with " + ", ".join(f"{c.key}={c.after}" for c in report.changes) if report.changes else ""
    return f"levers plan: {report.file.name}{what_if}"


def _bottleneck(path: PathPlan) -> str:
    if path.cpu_host:
        return f"cores of {path.cpu_host}, shared by its phases"
    if not path.bottleneck:
        return "unknown"
    tie = " (tie)" if len(path.bottleneck) > 1 else ""
    bound = "" if path.complete else f"; {', '.join(path.unknown)} unknown"
    return " = ".join(path.bottleneck) + tie + bound


def _throughput(path: PathPlan) -> str:
    if path.docs_per_second is None:
        return "unknown"
    return ("" if path.complete else "≤ ") + sig(path.docs_per_second)


def _latency(path: PathPlan) -> str:
    if path.stalled:
        return f"never ({', '.join(path.stalled)}: 0 workers)"
    if path.latency_seconds is None:
        return f"unknown (no job time for {', '.join(path.unknown)})"
    return duration(path.latency_seconds)


def _path_latency(path: PathPlan | None) -> str:
    return "-" if path is None else _latency(path).split(" (no job time")[0]


def _drain(path: PathPlan, burst: int) -> str:
    if path.stalled:
        return "never"
    seconds = drain_seconds(path, burst)
    return "unknown" if seconds is None else duration(seconds)


def _verdict(path: PathPlan, rate: Rate) -> str:
    verdict = keeps_up(path, rate)
    if verdict is None:
        return "unknown"
    word = "keeps up" if verdict else "falls behind"
    capacity = path.docs_per_second or 0.0
    return f"{word} ({percent(rate.per_second / capacity)} of capacity)" if capacity else word


def _names(names: Sequence[str]) -> str:
    return " = ".join(names) if names else "none"


def _pair(change: PhaseChange, key: str, show: Callable[[Any], str]) -> str:
    """``key`` of a phase before and after: one value when equal, "before → after" otherwise."""
    before, after = getattr(change.before, key, None), getattr(change.after, key, None)

    def cell(value: float | None) -> str:
        return "-" if value is None else show(value)

    return cell(after) if before == after else f"{cell(before)} → {cell(after)}"


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "unknown" if before != after else ""
    if before == after:
        return "="
    if before == 0:
        return "from 0"
    return f"{(after - before) / before:+.0%}"


def _numeric(rows: Rows, column: int) -> bool:
    """Whether a column holds numbers (right-aligned): every cell that has a value is one."""
    cells = [r[column] for r in rows if r[column] not in ("", "-", "unknown")]
    return bool(cells) and all(_is_number(c) for c in cells)


def _is_number(cell: str) -> bool:
    try:
        float(cell.rstrip("%"))
    except ValueError:
        return False
    return True
