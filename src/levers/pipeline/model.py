"""The pipeline model: what pipeline.yaml may say, with its bounds. Pure: no I/O here.

Every model forbids unknown keys, so a misspelt lever is an error rather than a silent default.
Every number has an upper bound and is strict: a boolean is not a number, and a whole number is
not written as 3.0. Checks that look across phases (``next`` targets, cycles, entry phases) live
in ``cross_checks``; they take time linear in the number of phases.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from levers.pipeline.dotted import did_you_mean

HANDLER_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
PHASE_NAME_PATTERN = r"^[a-z][a-z0-9_]*$"

# Upper bounds: every number in pipeline.yaml may be hostile. Each is far above what a real
# deployment needs and low enough that the machine survives it.

# `levers up` forks `workers` processes of every phase it runs on its own machine (a preloaded
# worker holds ~9 MB of its own, so 1024 are already ~10 GB): bounded per phase and in total, no
# file can fork-bomb a host. More throughput than that comes from more machines.
MAX_WORKERS = 256
MAX_WORKERS_TOTAL = 1024
# Object stores an artifact store can live in (documents/object_store.py).
STORE_SCHEMES = ("s3", "gs", "az")
# A phase is a queue, a row of `levers status`, Prometheus series and per-minute buckets in Redis,
# and a supervisor looks at every phase every tick; real pipelines have a handful of phases.
MAX_PHASES = 256
# Each concurrent call of a job usually holds a socket; a process may open 1024 files by default.
MAX_SEMAPHORE = 512
# Threads for blocking work in one worker: past a few per core they only contend, each on a stack.
MAX_THREADS = 64
# A week: longer than one phase of one document should ever run. The timeout is armed with
# signal.alarm (OverflowError from 2**31 s) and ends up in Redis TTLs (EXPIRE refuses past
# ~2**63 ms): both far above it.
MAX_TIMEOUT_S = 7 * 24 * 3600
# RQ keeps one delay per retry in the job's hash; a document that failed a hundred times is failing.
MAX_RETRIES = 100
# No retry waits longer than this: each retry doubles the delay up to it (levers.documents.routing).
MAX_RETRY_DELAY_S = 600
# `expect:` describes one job, which cannot outlast the longest timeout; a 2,000-page document
# with one call per chunk makes a few thousand calls.
MAX_CALLS_PER_JOB = 100_000
# One worker's share of a machine: the largest have a few hundred vCPUs and a few TB of RAM.
MAX_CPU = 1024
MAX_RAM_MB = 4 * 1024 * 1024
# Every call in a rate window is a member of a sorted set in Redis (~100 bytes), trimmed by a Lua
# script on each call; the highest API tiers allow tens of thousands of calls a minute.
MAX_RATE = 100_000
# Every call in flight is a lease in Redis that its holder renews every few seconds.
MAX_CONCURRENCY = 10_000
# A day covers per-day quotas; the window's key lives as long as the window.
MAX_WINDOW_S = 24 * 3600
# Jobs one autoscaled worker is expected to keep up with: past a million, a queue is not "per worker".
MAX_PER_WORKER = 1_000_000

# A batch is moved off its queue by one script and registered by one worker, and its documents
# are held (not run) while it fills: a thousand is past any provider's batch API, and a batch
# waits at most ten seconds to fill.
MAX_BATCH_SIZE = 1000
MAX_BATCH_WAIT_MS = 10_000

# A lower priority lane's minimum share of a phase's dequeues while it has work: 5 % by default,
# at most half, past which the lanes would no longer be an order of priority.
DEFAULT_MIN_LANE_SHARE = 0.05
MAX_MIN_LANE_SHARE = 0.5

# Failed documents' records stay in Redis this long by default (30 days), and at most a year: each
# is a hash and a set member, and a pipeline that fails often keeps one per failure for that long.
DEFAULT_FAILED_TTL_S = 30 * 24 * 3600
MAX_FAILED_TTL_S = 366 * 24 * 3600
# An hour at least: a failed document is there to be looked at and retried by a person.
MIN_FAILED_TTL_S = 3600
# Days a finished document's record may be kept at most, when `retention:` is given: ten years.
MAX_RETENTION_DAYS = 3650

# pydantic's strict modes: a whole number accepts int only (never bool, "3" or 3.0); a number
# accepts int and float (never bool or "3"), and no infinity or NaN.
Whole = StrictInt
Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LeverSettings(Strict):
    """The three parallelism levers of one phase."""

    workers: Annotated[
        Whole, Field(ge=0, le=MAX_WORKERS, description="Worker processes for this phase (lever 1).")
    ] = 1
    semaphore: Annotated[
        Whole,
        Field(
            ge=1,
            le=MAX_SEMAPHORE,
            description="Concurrent calls one job may make through ctx.gather/map (lever 2).",
        ),
    ] = 1
    threads: Annotated[
        Whole,
        Field(
            ge=0,
            le=MAX_THREADS,
            description="Threads per worker for blocking work; 0 runs it inline (lever 3).",
        ),
    ] = 0


class Expectation(Strict):
    """How long one job of a phase is expected to take, for `levers plan`.

    Exactly one form: ``seconds`` outright, or ``calls`` made ``semaphore`` at a time, each taking
    ``call_seconds``, plus ``fixed_seconds`` of other work: ceil(calls / semaphore) × call_seconds
    + fixed_seconds. The second form lets a what-if on the semaphore change the job time.
    """

    seconds: Annotated[
        Number | None,
        Field(gt=0, le=MAX_TIMEOUT_S, description="Seconds one job takes, whatever the semaphore."),
    ] = None
    calls: Annotated[
        Whole | None,
        Field(
            ge=1,
            le=MAX_CALLS_PER_JOB,
            description="Calls one job makes through ctx.gather/map, semaphore at a time.",
        ),
    ] = None
    call_seconds: Annotated[
        Number | None, Field(gt=0, le=MAX_TIMEOUT_S, description="Seconds one of those calls takes.")
    ] = None
    fixed_seconds: Annotated[
        Number,
        Field(
            ge=0, le=MAX_TIMEOUT_S, description="Seconds of a job's work besides its calls (with calls only)."
        ),
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
        Number | None,
        Field(ge=0, le=MAX_CPU, description="Share of one vCPU one worker uses, e.g. 0.5 for half."),
    ] = None
    ram_mb: Annotated[
        Number | None, Field(ge=0, le=MAX_RAM_MB, description="RAM one worker uses, in MB.")
    ] = None


class Autoscale(Strict):
    """Workers that follow the phase's queue: ceil((queued + running) / per_worker), from min to max."""

    min: Annotated[
        Whole, Field(ge=0, le=MAX_WORKERS, description="Fewest workers, however short the queue.")
    ] = 1
    max: Annotated[Whole, Field(ge=1, le=MAX_WORKERS, description="Most workers, however long the queue.")]
    per_worker: Annotated[
        Whole,
        Field(ge=1, le=MAX_PER_WORKER, description="Jobs (queued or running) that call for one more worker."),
    ] = 1
    scale_down_after: Annotated[
        Number,
        Field(
            ge=0,
            le=MAX_WINDOW_S,
            description="Seconds of lower demand before workers are stopped (the highest need over "
            "that window is kept).",
        ),
    ] = 60.0

    @model_validator(mode="after")
    def _ordered(self) -> Autoscale:
        if self.min > self.max:
            raise PydanticCustomError(
                "autoscale_order", "min {min} is above max {max}", {"min": self.min, "max": self.max}
            )
        return self


class BatchSettings(Strict):
    """How many jobs of a phase one worker takes at once, and how long it waits for them."""

    size: Annotated[
        Whole,
        Field(
            ge=1, le=MAX_BATCH_SIZE, description="Jobs a worker takes and runs together (1: one at a time)."
        ),
    ] = 1
    wait_ms: Annotated[
        Whole,
        Field(
            ge=0,
            le=MAX_BATCH_WAIT_MS,
            description="Milliseconds a worker waits for a batch to fill before it runs what it has.",
        ),
    ] = 0


class Phase(Strict):
    """One phase: the handler that does its work, where documents go next, and its levers."""

    handler: Annotated[
        str,
        Field(pattern=HANDLER_PATTERN, description="The phase's function as 'module:function'."),
    ]
    next: Annotated[str | None, Field(description="The phase that receives this one's output.")] = None
    levers: LeverSettings = LeverSettings()
    autoscale: Annotated[
        Autoscale | None,
        Field(description="Follow the queue between min and max workers; levers.workers is the start."),
    ] = None
    fixed: Annotated[
        list[Literal["workers", "semaphore", "threads"]],
        Field(
            description="Levers this phase keeps as declared: `levers advise` never proposes changing them."
        ),
    ] = []
    timeout: Annotated[
        Whole, Field(gt=0, le=MAX_TIMEOUT_S, description="Seconds one job may run before it is failed.")
    ] = 600
    retries: Annotated[
        Whole, Field(ge=0, le=MAX_RETRIES, description="Times a failed job is tried again.")
    ] = 2
    retry_delay: Annotated[
        Whole,
        Field(
            ge=0,
            le=MAX_RETRY_DELAY_S,
            description="Seconds before the first retry; each later one waits twice as long, "
            f"up to {MAX_RETRY_DELAY_S} s.",
        ),
    ] = 5
    accepts: Annotated[
        list[str],
        Field(description="File types an entry phase takes, as extensions ('.pdf'); '*' takes any."),
    ] = []
    input: Annotated[
        Literal["files", "bytes"],
        Field(description="How an entry phase receives documents: stored files, or bytes held in memory."),
    ] = "files"
    options: Annotated[
        dict[str, Any],
        Field(
            description="Settings for the phase's code, checked against the Options model its "
            "handler's module declares."
        ),
    ] = {}
    expect: Annotated[
        Expectation | None,
        Field(description="Expected job time, for `levers plan` (measured durations take precedence)."),
    ] = None
    resources: Annotated[
        Resources | None, Field(description="CPU and RAM of one worker, for the totals of `levers plan`.")
    ] = None
    batch: Annotated[
        BatchSettings,
        Field(
            description="Take up to size jobs at once (waiting wait_ms for them) for a batch handler, "
            "or to run a per-document handler on each under one set-up."
        ),
    ] = BatchSettings()

    @property
    def most_workers(self) -> int:
        """The most workers one host may run for this phase."""
        return max(self.levers.workers, self.autoscale.max if self.autoscale else 0)

    @field_validator("accepts")
    @classmethod
    def _normalise_types(cls, types: list[str]) -> list[str]:
        return [t if t == "*" else "." + t.lower().lstrip(".") for t in types]


class LimitSettings(Strict):
    """A limit shared by every worker of every phase on every host using the same Redis."""

    requests_per_minute: Annotated[
        Whole | None,
        Field(ge=1, le=MAX_RATE, description="Calls allowed in any sliding window of window_seconds."),
    ] = None
    concurrency: Annotated[
        Whole | None, Field(ge=1, le=MAX_CONCURRENCY, description="Calls allowed in flight at once.")
    ] = None
    window_seconds: Annotated[
        Number,
        Field(
            gt=0,
            le=MAX_WINDOW_S,
            description="Length of the rate window; 60 makes requests_per_minute exact.",
        ),
    ] = 60.0


class LaneSettings(Strict):
    """How a phase's workers share their dequeues between the priority lanes (high, normal, low)."""

    min_share: Annotated[
        Number,
        Field(
            ge=0,
            le=MAX_MIN_LANE_SHARE,
            description="Share of a phase's dequeues each lower lane gets at least while it has work, "
            "however busy the lanes above it are (0: strict priority).",
        ),
    ] = DEFAULT_MIN_LANE_SHARE


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
    store: Annotated[
        str,
        Field(
            description="The artifact store: a directory, relative to this file, or an object-store URL "
            "(s3://BUCKET/PREFIX, gs://, az://) with its endpoint and credentials in the environment."
        ),
    ] = ".levers/artifacts"
    phases: Annotated[
        dict[Annotated[str, Field(pattern=PHASE_NAME_PATTERN)], Phase],
        Field(
            min_length=1,
            max_length=MAX_PHASES,
            description=f"The phases, by name; at most {MAX_WORKERS_TOTAL} workers in all.",
        ),
    ]
    limits: Annotated[
        dict[str, LimitSettings],
        Field(description="Named limits that phases use through ctx.limit(name), held across hosts."),
    ] = {}
    failed_ttl: Annotated[
        Whole,
        Field(
            ge=MIN_FAILED_TTL_S,
            le=MAX_FAILED_TTL_S,
            description="Seconds a failed document's record is kept (for `levers failed` and "
            "`levers retry`) before it expires; default 30 days.",
        ),
    ] = DEFAULT_FAILED_TTL_S
    lanes: Annotated[
        LaneSettings,
        Field(description="Priority lanes: `levers submit --priority high|normal|low` picks one."),
    ] = LaneSettings()
    retention: Annotated[
        Number | None,
        Field(
            gt=0,
            le=MAX_RETENTION_DAYS,
            description="Days a done document's record is kept in Redis; past it only its id stays, "
            "so the same content is still not processed twice. Unset: kept for good.",
        ),
    ] = None
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

    @field_validator("store")
    @classmethod
    def _store_location(cls, store: str) -> str:
        if "://" not in store:
            return store
        parts = urlsplit(store)
        if parts.scheme not in STORE_SCHEMES:
            problem = f"an object store's URL starts with {', '.join(s + '://' for s in STORE_SCHEMES)}"
        elif not parts.netloc:
            problem = f"{parts.scheme}:// needs a bucket: {parts.scheme}://BUCKET/PREFIX"
        elif parts.query or parts.fragment or "@" in parts.netloc:
            problem = "put the store's options and credentials in the environment (AWS_*, GOOGLE_*, AZURE_*)"
        else:
            return store
        raise PydanticCustomError("store_url", problem)

    @field_validator("phases")
    @classmethod
    def _bounded_workers(cls, phases: dict[str, Phase]) -> dict[str, Phase]:
        total = sum(phase.most_workers for phase in phases.values())
        if total > MAX_WORKERS_TOTAL:
            raise PydanticCustomError(
                "workers_total",
                "{total} workers in all is above the bound of {bound} (one `levers up` runs them all "
                "on one machine); lower some phases' workers (or autoscale max)",
                {"total": total, "bound": MAX_WORKERS_TOTAL},
            )
        return phases

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
    entry_set = set(entries)
    for name, phase in pipeline.phases.items():
        if name not in entry_set and phase.accepts:
            problems.append(
                (("phases", name, "accepts"), f"{name!r} is not an entry phase, so accepts has no effect")
            )
    return problems


def _cycles(pipeline: Pipeline) -> list[tuple[tuple[str | int, ...], str]]:
    """Each loop of ``next`` once, from its first phase in file order.

    Every phase is walked once (a walk stops at a phase an earlier walk has seen), so this takes
    time linear in the number of phases.
    """
    order = {name: index for index, name in enumerate(pipeline.phases)}
    seen: set[str] = set()
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for start in pipeline.phases:
        walk: dict[str, None] = {}  # this walk's phases, in order, with O(1) membership
        current: str | None = start
        while current in pipeline.phases and current not in seen:
            seen.add(current)
            walk[current] = None
            current = pipeline.phases[current].next
        if current in walk:
            steps = list(walk)
            loop = steps[steps.index(current) :]
            first = min(range(len(loop)), key=lambda i: order[loop[i]])
            loop = loop[first:] + loop[:first]
            text = " -> ".join([*loop, loop[0]])
            problems.append((("phases", loop[0], "next"), f"phases form a cycle: {text}"))
    return problems
