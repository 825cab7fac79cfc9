"""The pipeline model: what pipeline.yaml may say, with its bounds. Pure: no I/O here.

Every model forbids unknown keys, so a misspelt lever is an error rather than a silent default.
Checks that look across phases (``next`` targets, cycles, entry phases) live in ``cross_checks``.
"""

from __future__ import annotations

from difflib import get_close_matches
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

HANDLER_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
PHASE_NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LeverSettings(Strict):
    """The three parallelism levers of one phase."""

    workers: Annotated[int, Field(ge=0, description="Worker processes for this phase (lever 1).")] = 1
    semaphore: Annotated[
        int, Field(ge=1, description="Concurrent calls one job may make through ctx.gather/map (lever 2).")
    ] = 1
    threads: Annotated[
        int, Field(ge=0, description="Threads per worker for blocking work; 0 runs it inline (lever 3).")
    ] = 0


class Expectation(Strict):
    """How long one job of a phase is expected to take, for `levers plan`.

    Exactly one form: ``seconds`` outright, or ``calls`` made ``semaphore`` at a time, each taking
    ``call_seconds``, plus ``fixed_seconds`` of other work: ceil(calls / semaphore) × call_seconds
    + fixed_seconds. The second form lets a what-if on the semaphore change the job time.
    """

    seconds: Annotated[
        float | None, Field(gt=0, description="Seconds one job takes, whatever the semaphore.")
    ] = None
    calls: Annotated[
        int | None,
        Field(ge=1, description="Calls one job makes through ctx.gather/map, semaphore at a time."),
    ] = None
    call_seconds: Annotated[float | None, Field(gt=0, description="Seconds one of those calls takes.")] = None
    fixed_seconds: Annotated[
        float, Field(ge=0, description="Seconds of a job's work besides its calls (with calls only).")
    ] = 0.0

    @model_validator(mode="after")
    def _exactly_one_form(self) -> Expectation:
        # a custom error type keeps pydantic's "Value error, " prefix out of the located message
        if self.seconds is not None and self.model_fields_set & {"calls", "call_seconds", "fixed_seconds"}:
            raise PydanticCustomError(
                "expect_form", "give either seconds, or calls with call_seconds (and fixed_seconds), not both"
            )
        if self.seconds is None and (self.calls is None or self.call_seconds is None):
            raise PydanticCustomError(
                "expect_form", "needs seconds, or calls with call_seconds (e.g. calls: 20, call_seconds: 3)"
            )
        return self


class Resources(Strict):
    """What one worker of a phase uses, for the CPU and RAM totals of `levers plan`."""

    cpu: Annotated[
        float | None, Field(ge=0, description="Share of one vCPU one worker uses, e.g. 0.5 for half.")
    ] = None
    ram_mb: Annotated[float | None, Field(ge=0, description="RAM one worker uses, in MB.")] = None


class Phase(Strict):
    """One phase: the handler that does its work, where documents go next, and its levers."""

    handler: Annotated[
        str,
        Field(pattern=HANDLER_PATTERN, description="The phase's function as 'module:function'."),
    ]
    next: Annotated[str | None, Field(description="The phase that receives this one's output.")] = None
    levers: LeverSettings = LeverSettings()
    timeout: Annotated[int, Field(gt=0, description="Seconds one job may run before it is failed.")] = 600
    retries: Annotated[int, Field(ge=0, description="Times a failed job is tried again.")] = 2
    retry_delay: Annotated[
        int, Field(ge=0, description="Seconds before the first retry; each later one waits twice as long.")
    ] = 5
    accepts: Annotated[
        list[str],
        Field(description="File types an entry phase takes, as extensions ('.pdf'); '*' takes any."),
    ] = []
    input: Annotated[
        Literal["files", "bytes"],
        Field(description="How an entry phase receives documents: stored files, or bytes held in memory."),
    ] = "files"
    options: Annotated[dict[str, Any], Field(description="Free-form settings for the phase's code.")] = {}
    expect: Annotated[
        Expectation | None,
        Field(description="Expected job time, for `levers plan` (measured durations take precedence)."),
    ] = None
    resources: Annotated[
        Resources | None, Field(description="CPU and RAM of one worker, for the totals of `levers plan`.")
    ] = None

    @field_validator("accepts")
    @classmethod
    def _normalise_types(cls, types: list[str]) -> list[str]:
        return [t if t == "*" else "." + t.lower().lstrip(".") for t in types]


class LimitSettings(Strict):
    """A limit shared by every worker of every phase on every host using the same Redis."""

    requests_per_minute: Annotated[
        int | None, Field(ge=1, description="Calls allowed in any sliding window of window_seconds.")
    ] = None
    concurrency: Annotated[int | None, Field(ge=1, description="Calls allowed in flight at once.")] = None
    window_seconds: Annotated[
        float, Field(gt=0, description="Length of the rate window; 60 makes requests_per_minute exact.")
    ] = 60.0


class Pipeline(Strict):
    """A whole pipeline.yaml."""

    name: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_-]+$",
            description="Prefix of this pipeline's queues and keys, so pipelines can share one Redis.",
        ),
    ] = "levers"
    redis: Annotated[
        str | None,
        Field(description="Redis URL; ${VAR} and ${VAR:-default} are expanded. REDIS_URL wins over it."),
    ] = None
    store: Annotated[str, Field(description="Directory of the artifact store, relative to this file.")] = (
        ".levers/artifacts"
    )
    phases: Annotated[dict[Annotated[str, Field(pattern=PHASE_NAME_PATTERN)], Phase], Field(min_length=1)]
    limits: Annotated[
        dict[str, LimitSettings],
        Field(description="Named limits that phases use through ctx.limit(name), held across hosts."),
    ] = {}
    preload: Annotated[
        list[str],
        Field(
            description="Modules the supervisor imports before it forks workers, so that all share "
            "one copy: heavy libraries a handler imports lazily.",
        ),
    ] = []
    summary: Annotated[
        str | None,
        Field(
            pattern=HANDLER_PATTERN,
            description="'module:function' that describes the results at the end of `levers run`.",
        ),
    ] = None

    def entry_phases(self) -> list[str]:
        """Phases no other phase feeds, in file order."""
        fed = {p.next for p in self.phases.values() if p.next}
        return [name for name in self.phases if name not in fed]

    def feeders(self, phase: str) -> list[str]:
        """The phases whose next is ``phase`` (none for an entry phase; several where routes meet)."""
        return [name for name, p in self.phases.items() if p.next == phase]


def cross_checks(pipeline: Pipeline) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems that span phases, each with the path of the key it is about."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    names = list(pipeline.phases)
    for name, phase in pipeline.phases.items():
        if phase.next is not None and phase.next not in pipeline.phases:
            hint = did_you_mean(phase.next, names)
            problems.append((("phases", name, "next"), f"next names no phase: {phase.next!r}{hint}"))
    problems.extend(_cycles(pipeline))
    if problems:
        # entry phases cannot be told apart while a next is dangling or looping
        return problems
    # with no dangling next and no cycle, some phase is always an entry phase
    entries = pipeline.entry_phases()
    for name in entries:
        if not pipeline.phases[name].accepts:
            problems.append(
                (("phases", name), f"entry phase {name!r} accepts no file types; add accepts: ['.pdf', ...]")
            )
    for name, phase in pipeline.phases.items():
        if name not in entries and phase.accepts:
            problems.append(
                (("phases", name, "accepts"), f"{name!r} is not an entry phase, so accepts has no effect")
            )
    return problems


def _cycles(pipeline: Pipeline) -> list[tuple[tuple[str | int, ...], str]]:
    reported: set[str] = set()
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for start in pipeline.phases:
        seen: list[str] = []
        current: str | None = start
        while current in pipeline.phases and current not in seen:
            seen.append(current)
            current = pipeline.phases[current].next
        if current == start and start not in reported:
            reported.update(seen)
            loop = " -> ".join([*seen, start])
            problems.append((("phases", start, "next"), f"phases form a cycle: {loop}"))
    return problems


def did_you_mean(word: str, choices: list[str]) -> str:
    """'; did you mean X?' for the closest choice, or '' when none is close."""
    match = get_close_matches(word, choices, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""
