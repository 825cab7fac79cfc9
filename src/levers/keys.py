"""Every Redis key and queue name levers uses, in one place. Imports nothing of levers.

All names carry the pipeline's name, so several pipelines can share one Redis.
"""

from __future__ import annotations

# How often a worker tells RQ it is alive; RQ expires a silent worker's key after about twice this.
WORKER_TTL_S = 35


# A phase's priority lanes, highest first. Each is an RQ queue of its own; the normal lane keeps
# the phase's plain queue name, the others add their lane after a colon (names of pipelines and
# phases have none).
LANES = ("high", "normal", "low")
NORMAL = "normal"


def stored_priority(value: bytes | str | None) -> str:
    """The lane a stored record names; normal for anything else (what Redis holds is not trusted)."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    return text if text in LANES else NORMAL


def queue_name(pipeline: str, phase: str, lane: str = NORMAL) -> str:
    """The RQ queue of a phase's lane, as `rq info` shows it."""
    return _lane_queue(f"{pipeline}.{phase}", lane)


def lane_queues(pipeline: str, phase: str) -> list[str]:
    """Every lane's queue of a phase, highest first."""
    return [queue_name(pipeline, phase, lane) for lane in LANES]


def lane_of(queue: str) -> tuple[str, str]:
    """The phase's plain queue name and the lane of a lane's queue name."""
    base, _, lane = queue.rpartition(":")
    return (base, lane) if base and lane in LANES and lane != NORMAL else (queue, NORMAL)


def sibling_lanes(queue: str) -> list[str]:
    """Every lane's queue of the phase whose lane ``queue`` is, highest first."""
    base = lane_of(queue)[0]
    return [_lane_queue(base, lane) for lane in LANES]


def lane_overtake(base_queue: str) -> str:
    """Pub/sub channel: a job entered the phase's high lane (workers holding a lower one taken
    ahead give it back for it)."""
    return f"levers:lanes:{base_queue}:high-pushed"


def _lane_queue(base: str, lane: str) -> str:
    return base if lane == NORMAL else f"{base}:{lane}"


def lane_state(base_queue: str) -> str:
    """Hash: a phase's lanes' starvation credits and dequeue counts (``base_queue``: its plain queue)."""
    return f"levers:lanes:{base_queue}"


def lane_wake(base_queue: str) -> str:
    """List of at most one item: set as a job enters any lane of the phase, gone once all are
    empty; idle workers block on it, since a blocking pop can wait on one list only."""
    return f"levers:lanes:{base_queue}:wake"


def document(pipeline: str, doc_id: str) -> str:
    """Hash: one document's state, per-phase times, attempts and errors."""
    return f"levers:{pipeline}:doc:{doc_id}"


def documents(pipeline: str) -> str:
    """Sorted set: the ids of documents not done (queued, running, failed), scored by submission time."""
    return f"levers:{pipeline}:docs"


def finished(pipeline: str) -> str:
    """Sorted set: the ids of done documents whose record is kept, scored by when they finished."""
    return f"levers:{pipeline}:finished"


def expired(pipeline: str) -> str:
    """Set: the ids of done documents whose record expired (``retention``): deduplication's index."""
    return f"levers:{pipeline}:expired"


def blob(pipeline: str, doc_id: str) -> str:
    """String: the bytes of a document submitted in memory, until its entry phase has run."""
    return f"levers:{pipeline}:blob:{doc_id}"


def versions(pipeline: str, name_digest: str) -> str:
    """Hash: the versions of one document name (``name_digest``: a hash of the name), by number."""
    return f"levers:{pipeline}:versions:{name_digest}"


def version_latest(pipeline: str) -> str:
    """Hash: name digest -> "number:id" of the newest version of each name whose versions' records
    expired (``retention``), so that the name's next content still gets the next number."""
    return f"levers:{pipeline}:version-latest"


def version_names(pipeline: str) -> str:
    """Set: every document name with versions, for `levers show NAME`."""
    return f"levers:{pipeline}:version-names"


def phase_counter(pipeline: str, phase: str) -> str:
    """Hash: per-phase totals (done, failed, retried)."""
    return f"levers:{pipeline}:phase:{phase}:totals"


def failed(pipeline: str, phase: str) -> str:
    """Sorted set: the ids of documents that failed at a phase and are kept, scored by when."""
    return f"levers:{pipeline}:phase:{phase}:failed"


def supervisors(pipeline: str) -> str:
    """Hash: supervisor id -> its JSON report, refreshed every tick."""
    return f"levers:{pipeline}:supervisors"


def config_error(pipeline: str) -> str:
    """String: the last pipeline.yaml error a running supervisor or worker saw, if any."""
    return f"levers:{pipeline}:config-error"


def limit_window(pipeline: str, limit: str) -> str:
    """Sorted set: one member per call admitted in a shared limit's rate window, scored by server ms."""
    return f"levers:{pipeline}:limit:{limit}:window"


def limit_leases(pipeline: str, limit: str) -> str:
    """Sorted set: lease ids of a shared limit's calls in flight, scored by their expiry in server ms."""
    return f"levers:{pipeline}:limit:{limit}:leases"


def limit_totals(pipeline: str, limit: str) -> str:
    """Hash: a shared limit's counters (calls, rate_limited, peak_in_flight)."""
    return f"levers:{pipeline}:limit:{limit}:totals"


def limit_adaptive(pipeline: str, limit: str) -> str:
    """Hash: what a shared limit learned of the provider (effective rate and concurrency, pauses)."""
    return f"levers:{pipeline}:limit:{limit}:adaptive"


def limit_refusals(pipeline: str, limit: str) -> str:
    """Sorted set: a shared limit's calls refused with 429/529 in the last minute, by server ms."""
    return f"levers:{pipeline}:limit:{limit}:refusals"


def phase_metrics(pipeline: str, phase: str, minute: int) -> str:
    """Hash: one phase's job counts, busy seconds and duration histogram for one minute."""
    return f"levers:{pipeline}:phase:{phase}:metrics:{minute}"


def phase_durations(pipeline: str, phase: str) -> str:
    """Hash: one phase's job durations since its first job (a count per histogram bucket, the
    count and the sum), never reset: the cumulative histogram Prometheus takes rates of."""
    return f"levers:{pipeline}:phase:{phase}:durations"


def lease(pipeline: str, supervisor: str) -> str:
    """String, expiring: a supervisor's lease, renewed every tick; gone means it stopped renewing."""
    return f"levers:{pipeline}:lease:{supervisor}"


def lease_records(pipeline: str) -> str:
    """Hash: supervisor id -> JSON (host, pid, phases, pipeline version, its workers' RQ names)."""
    return f"levers:{pipeline}:leases"


def lease_renewals(pipeline: str) -> str:
    """Hash: supervisor id -> when it last renewed its lease, in the server's milliseconds."""
    return f"levers:{pipeline}:lease-renewals"


def lost_leases(pipeline: str) -> str:
    """Set: ids of supervisors whose lease lapsed and whose jobs another supervisor took over."""
    return f"levers:{pipeline}:lost-leases"


def takeover(pipeline: str, supervisor: str) -> str:
    """String, expiring: the id of the supervisor taking over a lapsed lease's jobs (the claim)."""
    return f"levers:{pipeline}:takeover:{supervisor}"


def phase_limits(pipeline: str, phase: str) -> str:
    """Set, expiring: the shared limits one phase's jobs called lately, which cap its autoscaling."""
    return f"levers:{pipeline}:phase:{phase}:limits"


def reuse(pipeline: str, phase: str, key: str) -> str:
    """String, expiring: the digest of the result a phase's job stored under reuse key ``key``
    (levers.worker.reuse); the result itself is in the artifact store."""
    return f"levers:{pipeline}:reuse:{phase}:{key}"


def published_pipeline(pipeline: str) -> str:
    """Hash: the newest published version of the pipeline file (number, digest, text, by)."""
    return f"levers:{pipeline}:pipeline"


def published_versions(pipeline: str) -> str:
    """Sorted set: the digests of the versions published lately, scored by their number."""
    return f"levers:{pipeline}:pipeline-versions"


# Set: the names of the pipelines published on this server (for a `levers set` without a file).
PUBLISHED_PIPELINES = "levers:pipelines"
