"""What levers relies on in RQ beyond its documented API: every name, in one place, checked.

levers' classes override RQ's methods and use some of its private names. An RQ release that
renamed one would not fail where it matters: an override of a method RQ no longer calls is never
called (GuardedJob's callback guards among them), and a private name fails only on the path that
uses it, mid-job. ``missing()`` looks each name up in the installed RQ; ``levers up`` and
``levers run`` check it before they start a worker, and tests/test_rq_contract.py checks that
these lists name everything levers' code uses. pyproject.toml pins RQ to the releases levers is
tested with.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
from importlib.metadata import version
from pathlib import Path

from levers.errors import LeversError

# The releases levers is tested with, as pyproject.toml pins them.
TESTED_RQ = "rq>=3.0,<3.1"

# Private names of RQ that levers reads, calls or sets: "module:name" or "module:Class.name" (the
# private methods it overrides are under OVERRIDDEN).
PRIVATE = (
    "rq.job:_current_job",
    "rq.job:Job._success_callback_name",
    "rq.job:Job._failure_callback_name",
    "rq.job:Job._stopped_callback_name",
    "rq.queue:Queue._fetch_dequeued_job",
    "rq.scheduler:RQScheduler._install_signal_handlers",
    "rq.scheduler:RQScheduler._stop_requested",
    "rq.timeouts:BaseDeathPenalty._timeout",
    "rq.worker.base:BaseWorker._exc_handlers",
    "rq.worker.base:BaseWorker._finalize_failure",
    "rq.worker.base:BaseWorker._finalize_success",
    "rq.worker.base:BaseWorker._ordered_queues",
    "rq.worker.base:BaseWorker._shutdown_requested_date",
    "rq.worker.base:BaseWorker._state",
    "rq.worker.base:BaseWorker._stop_requested",
)

# What levers' subclasses of RQ's classes override (methods, properties, class settings): each
# must still be defined by one of the RQ classes the subclass derives from.
OVERRIDDEN: dict[str, tuple[str, ...]] = {
    "levers.documents.lanes:LaneQueue": ("push_job_id",),
    "levers.worker.guard:GuardedJob": (
        "failure_callback", "func", "restore", "send_webhooks", "stopped_callback", "success_callback",
    ),
    "levers.worker.rq_reconnect:ReconnectingWorker": (
        "_pubsub_exception_handler", "_start_scheduler", "check_for_suspension", "register_birth",
        "register_death", "run_maintenance_tasks", "set_shutdown_requested_date", "set_state", "subscribe",
        "unsubscribe",
    ),
    "levers.worker.rq_reconnect:ReconnectingScheduler": ("work",),
    "levers.worker.rq_take:TakingWorker": ("subscribe",),
    "levers.worker.rq_timeout:JobTimeout": ("cancel_death_penalty", "setup_death_penalty"),
    "levers.worker.rq_worker:LeversWorker": (
        "bootstrap", "check_for_suspension", "death_penalty_class", "dequeue_job_and_maintain_ttl",
        "execute_job", "handle_exception", "handle_execution_ended", "heartbeat", "job_class",
        "log_result_lifespan", "request_force_stop", "set_state", "teardown",
    ),
}  # fmt: skip


class UnsupportedRQ(LeversError):
    """The installed RQ lacks names levers relies on."""


def resolve(dotted: str) -> object:
    """The object ``module:name`` names (``name`` may be ``Class.attribute``)."""
    module, _, path = dotted.partition(":")
    found: object = importlib.import_module(module)
    for part in path.split("."):
        found = getattr(found, part)
    return found


def missing() -> list[str]:
    """The names above that the installed RQ lacks, as ``rq.worker.base:BaseWorker._state`` (a
    private name) or ``LeversWorker.execute_job (overrides nothing in RQ)``."""
    gone = [name for name in PRIVATE if not _private_found(name)]
    for dotted, names in OVERRIDDEN.items():
        cls = resolve(dotted)
        assert isinstance(cls, type)
        rq_bases = rq_classes_of(cls)
        gone += [
            f"{cls.__name__}.{name} (overrides nothing in RQ)"
            for name in names
            if not any(name in vars(base) for base in rq_bases)
        ]
    return gone


def check() -> None:
    """Raise UnsupportedRQ, naming what is missing, unless the installed RQ has it all."""
    gone = missing()
    if gone:
        raise UnsupportedRQ(
            f"rq {version('rq')} lacks what levers' workers rely on: {', '.join(gone)}",
            fix=f"pip install '{TESTED_RQ}': the releases levers is tested with",
        )


def rq_classes_of(cls: type) -> list[type]:
    """The classes of RQ that ``cls`` derives from."""
    return [base for base in cls.__mro__[1:] if base.__module__.split(".")[0] == "rq"]


def _private_found(dotted: str) -> bool:
    module, _, path = dotted.partition(":")
    owner, _, name = path.rpartition(".")
    if not owner:
        return hasattr(importlib.import_module(module), name)
    try:
        cls = resolve(f"{module}:{owner}")
    except AttributeError:
        return False
    assert isinstance(cls, type)
    return hasattr(cls, name) or any(_assigned(base, name) for base in cls.__mro__ if base is not object)


def _assigned(cls: type, name: str) -> bool:
    """Whether the module of ``cls`` sets ``self.<name>``: an attribute only instances have. (The
    module's text, not the class's: ``inspect.getsource`` of a class parses its whole module.)"""
    pattern = rf"self\.{re.escape(name)}(: [^=\n]+)? = "
    return re.search(pattern, _module_text(cls.__module__)) is not None


@functools.cache
def _module_text(module: str) -> str:
    source = inspect.getsourcefile(sys.modules[module])
    return Path(source).read_text(encoding="utf-8") if source else ""
