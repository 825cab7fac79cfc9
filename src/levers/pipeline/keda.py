"""KEDA's objects for `levers deploy k8s --keda`: a ScaledObject per phase, which scales the phase's
Deployment as levers' own autoscaling scales workers, ceil((queued + running) / per_worker) between
min and max over every priority lane, and the TriggerAuthentication they share.

KEDA's redis scaler counts a key whatever its type: a list (a lane's queue) with LLEN, a sorted
set (RQ's registry of the jobs being run) with ZCARD. A trigger per lane and key, and a formula
that adds them up (``scalingModifiers``, KEDA 2.12 and later), make the phase's demand as
levers.supervisor.demand reads it. Fields follow KEDA's CRDs (keda.sh/v1alpha1).
"""

from __future__ import annotations

import math
from typing import Any

from rq import Queue
from rq.registry import StartedJobRegistry

from levers import keys
from levers.pipeline.model import Autoscale, Phase

KEDA_API = "keda.sh/v1alpha1"
# How often KEDA reads the queues; levers' own autoscaling decides every tick.
KEDA_POLL_S = 10
# Kubernetes' bound on an HPA's stabilization window; scale_down_after may be up to a day.
MAX_HPA_WINDOW_S = 3600


def scales(phase: Phase) -> bool:
    """A phase declared with no worker and no autoscale stays stopped, not scaled on its queue."""
    return phase.autoscale is not None or phase.levers.workers > 0


def scaled_object(
    pipeline: str, phase: str, spec: Phase, metadata: dict[str, Any], auth: str
) -> dict[str, Any]:
    """The ScaledObject of ``phase``, named as its Deployment (``metadata``). A phase without
    autoscale scales from 1 to its workers pods, one per job."""
    bounds = spec.autoscale or Autoscale(min=1, max=spec.levers.workers)
    triggers: list[dict[str, Any]] = []
    for lane in keys.LANES:
        queue = keys.queue_name(pipeline, phase, lane)
        for what, key in (
            ("queued", Queue.redis_queue_namespace_prefix + queue),
            ("running", StartedJobRegistry.key_template.format(queue)),
        ):
            triggers.append(
                {
                    "type": "redis",
                    "name": f"{lane}_{what}",
                    "metadata": {"listName": key, "listLength": str(bounds.per_worker)},
                    "authenticationRef": {"name": auth},
                }
            )
    window = min(math.ceil(bounds.scale_down_after), MAX_HPA_WINDOW_S)
    return {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": metadata,
        "spec": {
            "scaleTargetRef": {"name": metadata["name"]},
            "pollingInterval": KEDA_POLL_S,
            "cooldownPeriod": window,  # before the last pod stops, when min is 0
            "minReplicaCount": bounds.min,
            "maxReplicaCount": bounds.max,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    # KEDA's default, keda-hpa-NAME, can pass the 63 characters a name may have
                    "name": metadata["name"],
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": window}},
                },
                "scalingModifiers": {
                    "formula": " + ".join(t["name"] for t in triggers),
                    "target": str(bounds.per_worker),
                    "metricType": "AverageValue",
                },
            },
            "triggers": triggers,
        },
    }


def trigger_authentication(metadata: dict[str, Any], secret: str) -> dict[str, Any]:
    """KEDA reads Redis itself, with the address (host:port) and password from the Secret."""
    return {
        "apiVersion": KEDA_API,
        "kind": "TriggerAuthentication",
        "metadata": metadata,
        "spec": {
            "secretTargetRef": [
                {"parameter": "address", "name": secret, "key": "REDIS_ADDRESS"},
                {"parameter": "password", "name": secret, "key": "REDIS_PASSWORD"},
            ]
        },
    }
