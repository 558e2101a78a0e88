"""deploy/: what each workload runs with: probes against container ports and the standard gRPC
health service, resource requests and the GPU request, the ConfigMap every container reads, the
pool unit (an executor and its scheduler, the pool id and advertised address, a standby per
pool index), Redis persistence and password, the HPA's metric against the gateway's /metrics
and the prometheus-adapter rule that serves it, the NetworkPolicy and the disruption budgets
(the schemas, Services, commands and addresses: test_manifests.py)."""

from __future__ import annotations

import pytest
import yaml
from deploy_manifests import (
    ALL,
    DEPLOY,
    config_map_keys,
    container_id,
    containers,
    env_source,
    flags,
    named,
    pagedserve_containers,
    pod_spec,
    port_number,
    workloads,
)

from pagedserve.common.models import REPO_ROOT

# --- probes and resources -----------------------------------------------------------------


def grpc_port(container: dict) -> int:
    f = flags(container)
    return int(f.get("--grpc-port", f.get("--port", 0)))


@pytest.mark.parametrize("item", pagedserve_containers(), ids=container_id)
def test_grpc_health_probes(item):
    """Readiness (or, for the gateway whose gRPC health is liveness only, start-up) asks the
    standard gRPC health service on the container's gRPC port; every probe names a port the
    container has."""
    _, container = item
    role = container["command"][1]
    probes = {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container}
    assert {"readinessProbe", "livenessProbe"} <= probes.keys()
    for probe in probes.values():
        kind = next(k for k in ("grpc", "httpGet", "tcpSocket") if k in probe)
        assert port_number(container, probe[kind]["port"]) in [p["containerPort"] for p in container["ports"]]
        if kind == "grpc":
            assert probe["grpc"]["port"] == grpc_port(container)
    grpc_probed = "startupProbe" if role == "gateway" else "readinessProbe"
    assert "grpc" in probes[grpc_probed], f"{role}: {grpc_probed} is not a gRPC health probe"
    if role in ("executor", "tokenizer"):
        assert "grpc" in probes["livenessProbe"]
    if role == "scheduler":
        # A standby, or a scheduler whose executor restarts, is NOT_SERVING and must live on.
        assert probes["livenessProbe"]["tcpSocket"]["port"] == grpc_port(container)
    if role == "gateway":
        assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
        assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert port_number(container, probes["readinessProbe"]["httpGet"]["port"]) == int(
            flags(container)["--http-port"]
        )


@pytest.mark.parametrize("item", containers(), ids=container_id)
def test_every_container_requests_resources(item):
    _, container = item
    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= requests.keys()


def test_gpus_go_to_executors_only():
    for workload, container in containers():
        wants = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        if container.get("command", [""])[:2] == ["pagedserve", "executor"]:
            assert wants == 1 and container["resources"]["requests"]["nvidia.com/gpu"] == 1
        else:
            assert wants is None and "nvidia.com/gpu" not in container["resources"]["requests"], container_id(
                (workload, container)
            )


@pytest.mark.parametrize("item", pagedserve_containers(), ids=container_id)
def test_config_comes_from_the_config_map(item):
    _, container = item
    (source,) = container["envFrom"]
    assert source["configMapRef"]["name"] in config_map_keys()
    if "--model" in flags(container):
        assert flags(container)["--model"] == "$(PAGEDSERVE_MODEL)"
        assert "PAGEDSERVE_MODEL" in config_map_keys()[source["configMapRef"]["name"]]


# --- the pool unit --------------------------------------------------------------------------


def test_pool_pod_is_an_executor_and_its_scheduler():
    pool = named("StatefulSet", "pool")
    executor, scheduler = pod_spec(pool)["containers"]
    assert executor["command"][:2] == ["pagedserve", "executor"]
    assert scheduler["command"][:2] == ["pagedserve", "scheduler"]
    f = flags(scheduler)
    assert f["--executor"] == f"127.0.0.1:{flags(executor)['--port']}"
    # The pool id is the pod's (stable) name; gateways dial the pod IP at the scheduler's port.
    assert f["--pool-id"] == "$(POD_NAME)"
    assert env_source(scheduler, "POD_NAME") == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert f["--advertise-address"] == f"$(POD_IP):{f['--port']}"
    assert env_source(scheduler, "POD_IP") == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_standby_schedulers_stand_by_for_the_pool_of_the_same_index():
    pool, standby = named("StatefulSet", "pool"), named("StatefulSet", "pool-standby")
    (scheduler,) = pod_spec(standby)["containers"]
    f = flags(scheduler)
    # pool-standby-N takes pool-N's id (pool-N is pool's pod N: its --pool-id is its name).
    assert f["--pool-id"] == f"{pool['metadata']['name']}-$(POOL_INDEX)"
    assert env_source(scheduler, "POOL_INDEX") == {
        "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}
    }
    assert f["--executor"] == f"{pool['metadata']['name']}-$(POOL_INDEX).{pool['spec']['serviceName']}:50054"
    assert f["--advertise-address"] == f"$(POD_IP):{f['--port']}"
    assert "nvidia.com/gpu" not in scheduler["resources"]["requests"]
    assert standby["spec"]["replicas"] == pool["spec"]["replicas"]
    (pool_scheduler,) = [c for c in pod_spec(pool)["containers"] if c["name"] == "scheduler"]
    shared = ("--redis-url", "--port", "--host")
    assert {k: f[k] for k in shared} == {k: flags(pool_scheduler)[k] for k in shared}


# --- Redis, gateway scaling -------------------------------------------------------------------


def test_redis_persists_to_a_volume_claim():
    redis = named("StatefulSet", "redis")
    (container,) = pod_spec(redis)["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (mount,) = container["volumeMounts"]
    assert mount == {"name": claim["metadata"]["name"], "mountPath": data_dir}
    assert claim["spec"]["resources"]["requests"]["storage"]


def test_redis_requires_the_secrets_password():
    (container,) = pod_spec(named("StatefulSet", "redis"))["containers"]
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDISCLI_AUTH)"
    (auth,) = [v for v in container["env"] if v["name"] == "REDISCLI_AUTH"]
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "pagedserve-redis", "key": "password"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["sh", "-c", "redis-cli ping | grep -q PONG"]


def test_gateway_autoscales_on_a_metric_the_gateway_exports():
    hpa = named("HorizontalPodAutoscaler", "gateway")
    target = hpa["spec"]["scaleTargetRef"]
    assert named(target["kind"], target["name"])["apiVersion"] == target["apiVersion"]
    (pods_metric,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    name = pods_metric["pods"]["metric"]["name"]
    assert f'"{name}"' in (REPO_ROOT / "services/gateway/metrics.py").read_text()
    adapter = yaml.safe_load((DEPLOY / "monitoring/prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    gateway = named("Deployment", "gateway")
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    (container,) = pod_spec(gateway)["containers"]
    assert annotations["prometheus.io/port"] == flags(container)["--http-port"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert hpa["spec"]["minReplicas"] <= gateway["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


def test_network_policy_closes_everything_but_the_gateway():
    policy = named("NetworkPolicy", "pagedserve-internal")
    selector = policy["spec"]["podSelector"]
    (expression,) = selector["matchExpressions"]
    assert expression["key"] == "app.kubernetes.io/component" and expression["operator"] == "In"
    components = {
        w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] for w in workloads()
    }
    assert set(expression["values"]) == components - {"gateway"}
    # Every pagedserve pod may still reach them (the policy's peers match every workload).
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    for workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert peer["podSelector"]["matchLabels"].items() <= labels.items()
        assert selector["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize(
    "budget", [d for d in ALL if d["kind"] == "PodDisruptionBudget"], ids=lambda d: d["metadata"]["name"]
)
def test_disruption_budget_selects_one_workload(budget):
    selector = budget["spec"]["selector"]["matchLabels"]
    (workload,) = [
        w for w in workloads() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert workload["metadata"]["name"] == budget["metadata"]["name"]
