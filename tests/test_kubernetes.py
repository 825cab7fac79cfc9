"""`levers deploy k8s`: manifests checked against Kubernetes' own schemas (kubernetes-validate,
offline) and KEDA's CRD schema (tests/data/keda, from kedacore/keda), and read as a cluster would
read them: which command each pod runs, how long a stop may take, where secrets come from, and
which Redis keys KEDA counts, evaluated with KEDA's own script on a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml

from levers.pipeline.kubernetes import HEALTH_FILE, STOP_MARGIN_S
from tests.conftest import levers

KEDA_SCHEMAS = Path(__file__).parent / "data" / "keda"
# Oldest and newest Kubernetes the bundled schemas cover.
VERSIONS = (kubernetes_validate.utils.all_versions()[0], kubernetes_validate.utils.latest_version())

PIPELINE = """\
# the team's pipeline: comments and layout reach the ConfigMap as written
name: Team_Docs
store: s3://team-bucket/levers
redis: ${REDIS_URL}
phases:
  extraction:
    handler: json:dumps
    accepts: [.pdf, .txt]
    next: kg_ingest
    levers: {workers: 3}
    timeout: 900
    resources: {cpu: 0.5, ram_mb: 300}
  kg_ingest:
    handler: json:loads
    levers: {workers: 2}
    autoscale: {min: 0, max: 8, per_worker: 4, scale_down_after: 120}
    timeout: 60
  archive:
    handler: json:loads
    accepts: [.zip]
    levers: {workers: 0}
"""

# The parameters of KEDA's redis scaler (pkg/scalers/redis_scaler.go, its `keda:` tags): metadata
# a trigger may carry, and what a TriggerAuthentication may set.
REDIS_METADATA = {"listName", "listLength", "activationListLength", "databaseIndex", "enableTLS",
                  "unsafeSsl", "address", "addresses", "host", "hosts", "port", "ports", "username",
                  "password"}  # fmt: skip
REDIS_AUTH_PARAMS = {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
                     "sentinelUsername", "sentinelPassword", "sentinelMaster", "tls", "ca", "cert", "key",
                     "keyPassword"}  # fmt: skip
# KEDA's redis scaler counts a key with this script (redis_scaler.go), whatever its type.
KEDA_LENGTH = """
local listName = KEYS[1]
local listType = redis.call('type', listName).ok
if listType == 'zset' then
    return redis.call('zcard', listName)
elseif listType == 'set' then
    return redis.call('scard', listName)
elseif listType == 'hash' then
    return redis.call('hlen', listName)
elseif listType == 'list' or listType == 'none' then
    return redis.call('llen', listName)
else
    return redis.error_reply('ERR unsupported key type: ' .. listType)
end
"""


def deploy(root: Path, *flags: str, text: str = PIPELINE) -> tuple[list[dict[str, Any]], str]:
    (root / "pipeline.yaml").write_text(text)
    result = levers("deploy", "k8s", *flags, cwd=root)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc], result.stderr


def refused(root: Path, *flags: str, text: str = PIPELINE) -> str:
    """What `levers deploy k8s` said as it refused: exit 2, one line, nothing on stdout."""
    (root / "pipeline.yaml").write_text(text)
    result = levers("deploy", "k8s", *flags, cwd=root)
    assert result.returncode == 2, result
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [found] = deployment["spec"]["template"]["spec"]["containers"]
    return found


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("keda", [False, True])
def test_every_object_is_valid_for_kubernetes(tmp_path: Path, keda: bool) -> None:
    objects, _ = deploy(tmp_path, "--namespace", "ingest", *(["--keda"] if keda else []))

    core = [obj for obj in objects if not obj["apiVersion"].startswith("keda.sh/")]
    assert sorted(obj["kind"] for obj in core) == ["ConfigMap", *["Deployment"] * 3]
    for obj in core:
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)  # raises on any unknown field
        assert obj["metadata"]["namespace"] == "ingest"


def test_a_deployment_per_phase_runs_one_worker_per_pod(tmp_path: Path) -> None:
    objects, notes = deploy(tmp_path, "--image", "registry.example:5000/team/levers:1.4")
    deployments = by_kind(objects, "Deployment")

    # DNS-1123 names: the pipeline's in lowercase, '_' as '-'
    assert set(deployments) == {"team-docs-extraction", "team-docs-kg-ingest", "team-docs-archive"}
    replicas = {name: d["spec"]["replicas"] for name, d in deployments.items()}
    # workers; for an autoscaled phase its starting count within its bounds; 0 stays 0
    assert replicas == {"team-docs-extraction": 3, "team-docs-kg-ingest": 2, "team-docs-archive": 0}
    extraction = container(deployments["team-docs-extraction"])
    assert extraction["image"] == "registry.example:5000/team/levers:1.4"
    assert extraction["command"] == ["levers", "up"]
    args = extraction["args"]
    assert (flag(args, "--phase"), flag(args, "--workers"), flag(args, "--health-file")) == (
        "extraction",
        "1",
        HEALTH_FILE,
    )
    assert extraction["resources"] == {"requests": {"cpu": "500m", "memory": "300Mi"}}
    # the worker's job gets its whole timeout, and the pod longer than that to put a job back
    for name, timeout in (("team-docs-extraction", 900), ("team-docs-kg-ingest", 60)):
        args = container(deployments[name])["args"]
        assert float(flag(args, "--grace")) == timeout
        grace = deployments[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace == timeout + STOP_MARGIN_S
    # liveness from the health file `levers up` touches, the probe in plain Python
    probe = extraction["livenessProbe"]["exec"]["command"]
    assert probe[:2] == ["python", "-c"] and probe[3] == HEALTH_FILE
    assert "kg_ingest declares autoscale" in notes and "--keda" in notes


def test_the_health_probe_tells_a_fresh_heartbeat_from_a_stale_one(tmp_path: Path) -> None:
    [deployment, *_] = by_kind(deploy(tmp_path)[0], "Deployment").values()
    _, _, script, _, max_age = container(deployment)["livenessProbe"]["exec"]["command"]
    health = tmp_path / "health"

    def probe() -> int:
        command = [sys.executable, "-c", script, str(health), max_age]
        return subprocess.run(command, capture_output=True, check=False).returncode

    assert probe() != 0  # not started yet
    health.touch()
    assert probe() == 0
    os.utime(health, (0, 0))
    assert probe() != 0


def test_secrets_come_from_the_secret_by_reference_and_never_appear(tmp_path: Path) -> None:
    generated_with = {"REDIS_URL": "redis://:hunter2-secret@redis.internal:6379/0"}
    result = levers(
        "deploy", "k8s", "--keda", "--secret", "team-keys", cwd=_write(tmp_path, PIPELINE), env=generated_with
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for deployment in by_kind(objects, "Deployment").values():
        found = container(deployment)
        assert found["env"] == [
            {"name": "REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "team-keys", "key": "REDIS_URL"}}}
        ]
        assert found["envFrom"] == [{"secretRef": {"name": "team-keys"}}]
    [auth] = by_kind(objects, "TriggerAuthentication").values()
    assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} == {"team-keys"}
    assert "Secret 'team-keys'" in result.stderr


def test_the_config_map_holds_pipeline_yaml_as_written(tmp_path: Path) -> None:
    odd = PIPELINE.replace("    timeout: 60\n", "    timeout: 60   \n")  # trailing blanks: no block scalar
    for text in (PIPELINE, odd):
        objects, _ = deploy(tmp_path, text=text)
        [config] = by_kind(objects, "ConfigMap").values()
        assert config["data"] == {"pipeline.yaml": text}
        for deployment in by_kind(objects, "Deployment").values():
            volumes = deployment["spec"]["template"]["spec"]["volumes"]
            assert {"name": "pipeline", "configMap": {"name": config["metadata"]["name"]}} in volumes
    # a changed file changes the pods' template, so applying it rolls them
    first, _ = deploy(tmp_path)
    second, _ = deploy(tmp_path, text=PIPELINE.replace("workers: 3", "workers: 4"))
    before, after = (
        [d["spec"]["template"]["metadata"]["annotations"] for d in by_kind(run, "Deployment").values()]
        for run in (first, second)
    )
    assert all(old != new for old, new in zip(before, after, strict=True))


def test_output_writes_one_file_per_object(tmp_path: Path) -> None:
    objects, _ = deploy(tmp_path, "--keda")
    result = levers("deploy", "k8s", "--keda", "--output", "k8s", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / "k8s").glob("*.yaml"))
    written = [doc for path in files for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert len(files) == len(objects) == len(written)
    key = lambda obj: (obj["kind"], obj["metadata"]["name"])  # noqa: E731
    assert sorted(written, key=key) == sorted(objects, key=key)


# --- KEDA ----------------------------------------------------------------------------------------


def crd_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((KEDA_SCHEMAS / f"{kind}.json").read_text())
    return schema


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare: Kubernetes prunes them from a structural schema's
    objects, so a misspelt KEDA field would be dropped without a word."""
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}/{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{path}/{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}/{index}")
    return found


def test_keda_objects_match_kedas_crd_schema(tmp_path: Path) -> None:
    # a phase whose name leaves no room for KEDA's "keda-hpa-" before it
    long_phase = PIPELINE.replace("kg_ingest", "kg_" + "i" * 47)
    objects, _ = deploy(tmp_path, "--keda", "--namespace", "ingest", text=long_phase)
    scaled = by_kind(objects, "ScaledObject")
    [auth] = by_kind(objects, "TriggerAuthentication").values()

    for obj, kind in [*((s, "scaledobject") for s in scaled.values()), (auth, "triggerauthentication")]:
        schema = crd_schema(kind)
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.validate(obj, schema)
        assert unknown_fields(obj, schema) == []
        assert obj["metadata"]["namespace"] == "ingest"
    for obj in scaled.values():
        spec = obj["spec"]
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]  # the CRD's CEL rule
        assert {t["type"] for t in spec["triggers"]} == {"redis"}
        assert all(set(t["metadata"]) <= REDIS_METADATA for t in spec["triggers"])
        assert {t["authenticationRef"]["name"] for t in spec["triggers"]} == {auth["metadata"]["name"]}
        # the formula adds every trigger's count, by the names the triggers carry, each once
        names = [t["name"] for t in spec["triggers"]]
        assert len(set(names)) == len(names)
        modifiers = spec["advanced"]["scalingModifiers"]
        assert sorted(modifiers["formula"].split(" + ")) == sorted(names)
        assert float(modifiers["target"]) > 0
        # KEDA's webhook: the object's and its HPA's names are label values, at most 63 characters
        name = obj["metadata"]["name"]
        hpa = spec["advanced"]["horizontalPodAutoscalerConfig"].get("name", f"keda-hpa-{name}")
        assert len(name) <= 63 and len(hpa) <= 63
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} <= REDIS_AUTH_PARAMS


def test_keda_scales_each_phase_within_its_bounds(tmp_path: Path) -> None:
    objects, _ = deploy(tmp_path, "--keda")
    scaled = by_kind(objects, "ScaledObject")
    deployments = by_kind(objects, "Deployment")

    # a phase declared with no worker stays stopped: no ScaledObject, replicas 0
    assert set(scaled) == {"team-docs-extraction", "team-docs-kg-ingest"}
    assert deployments["team-docs-archive"]["spec"]["replicas"] == 0
    for name, obj in scaled.items():
        assert obj["spec"]["scaleTargetRef"] == {"name": name}
        assert "replicas" not in deployments[name]["spec"]  # the ScaledObject owns the count
    kg = scaled["team-docs-kg-ingest"]["spec"]
    assert (kg["minReplicaCount"], kg["maxReplicaCount"]) == (0, 8)
    assert kg["advanced"]["scalingModifiers"]["target"] == "4"
    assert {t["metadata"]["listLength"] for t in kg["triggers"]} == {"4"}
    assert kg["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 120
    }
    extraction = scaled["team-docs-extraction"]["spec"]
    assert (extraction["minReplicaCount"], extraction["maxReplicaCount"]) == (1, 3)  # workers: the most
    assert extraction["advanced"]["scalingModifiers"]["target"] == "1"


def test_keda_counts_every_lane_of_the_queue_levers_fills(
    tmp_path: Path, redis_url: str, connection: redis.Redis
) -> None:
    objects, _ = deploy(tmp_path, "--keda")
    # the same pipeline with a local store, to submit to the test's server
    _write(tmp_path, PIPELINE.replace("s3://team-bucket/levers", ".levers/artifacts"), "local.yaml")
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}")
    assert levers("submit", "-f", "local.yaml", "doc0.txt", "doc1.txt", cwd=tmp_path).returncode == 0
    high = levers("submit", "-f", "local.yaml", "--priority", "high", "doc2.txt", cwd=tmp_path)
    assert high.returncode == 0, high.stderr

    triggers = by_kind(objects, "ScaledObject")["team-docs-extraction"]["spec"]["triggers"]
    counts = {t["name"]: connection.eval(KEDA_LENGTH, 1, t["metadata"]["listName"]) for t in triggers}
    assert counts["normal_queued"] == 2 and counts["high_queued"] == 1
    assert sum(counts.values()) == 3
    # the running jobs' registry is a sorted set KEDA counts too
    running = next(t for t in triggers if t["name"] == "normal_running")["metadata"]["listName"]
    connection.zadd(running, {"a-job": 1})
    assert connection.eval(KEDA_LENGTH, 1, running) == 1


# --- refusals ------------------------------------------------------------------------------------


def test_names_and_values_kubernetes_cannot_take_are_refused(tmp_path: Path) -> None:
    assert "--namespace 'Team_NS' is not a Kubernetes name" in refused(tmp_path, "--namespace", "Team_NS")
    assert "--secret" in refused(tmp_path, "--secret", "a" * 64)
    assert "is not an image reference" in refused(tmp_path, "--image", "levers:1.0 --privileged")
    long_phase = PIPELINE.replace("kg_ingest", "kg_" + "i" * 60)
    assert "not a Kubernetes name" in refused(tmp_path, text=long_phase)
    bad_name = PIPELINE.replace("name: Team_Docs", "name: team_")
    assert "the pipeline's name 'team-'" in refused(tmp_path, text=bad_name)


def test_a_graph_phase_without_a_named_database_gets_a_note(tmp_path: Path) -> None:
    graph = PIPELINE.replace(
        "handler: json:loads\n    levers: {workers: 2}",
        "handler: phases.kg_ingest:ingest_graph\n    levers: {workers: 2}",
    )
    named = graph.replace(
        "    timeout: 60\n", "    timeout: 60\n    options: {graph: 'falkor://graph.internal:6379'}\n"
    )

    _, unnamed_notes = deploy(tmp_path, "--image", "x/levers:1", text=graph)
    _, named_notes = deploy(tmp_path, "--image", "x/levers:1", text=named)

    assert "kg_ingest writes the knowledge graph" in unnamed_notes and "FALKORDB_URL" in unnamed_notes
    assert "writes the knowledge graph" not in named_notes


def test_a_store_pods_cannot_share_is_refused(tmp_path: Path) -> None:
    local = PIPELINE.replace("s3://team-bucket/levers", ".levers/artifacts")
    assert "store: .levers/artifacts is a directory on one machine" in refused(tmp_path, text=local)


def test_a_password_written_in_pipeline_yaml_is_refused(tmp_path: Path) -> None:
    for redis_value in ("redis://:hunter2@redis:6379/0", "${REDIS_URL:-redis://user:hunter2@redis:6379}"):
        said = refused(tmp_path, text=PIPELINE.replace("${REDIS_URL}", redis_value))
        assert "redis: in pipeline.yaml holds a password" in said and "hunter2" not in said


def _write(root: Path, text: str, name: str = "pipeline.yaml") -> Path:
    (root / name).write_text(text)
    return root
