"""deploy/: every Kubernetes manifest against the Kubernetes OpenAPI schemas (strict: an
unknown or misspelled field fails), and the references between them: Service selectors and
ports against the pods they select, every container command against the pagedserve
subcommand's own parser, the addresses services dial against the Services and ports that
answer there, probes against container ports, the pool id and advertised address, the GPU
request, Redis persistence, the ConfigMap and Secret every container reads, and the HPA's
metric against the gateway's /metrics and the prometheus-adapter rule that serves it."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pagedserve.cli import SUBCOMMANDS, build_parser
from pagedserve.common.models import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
KUSTOMIZATION = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
MANIFEST_FILES = sorted([*DEPLOY.glob("k8s/*.yaml"), *DEPLOY.glob("optional/*.yaml")])
# The oldest Kubernetes they are meant for (gRPC probes are GA since 1.27, the StatefulSet
# pod-index label since 1.28) and the newest the validator knows.
K8S_VERSIONS = ("1.28", kubernetes_validate.latest_version())


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


DOCS = [(path, doc) for path in MANIFEST_FILES for doc in load(path)]
BASE = [doc for path, doc in DOCS if path.parent.name == "k8s"]
ALL = [doc for _, doc in DOCS]
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def named(kind: str, name: str, docs: list[dict] = ALL) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workloads(docs: list[dict] = ALL) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(docs: list[dict] = ALL) -> list[tuple[dict, dict]]:
    return [(w, c) for w in workloads(docs) for c in pod_spec(w)["containers"]]


def pagedserve_containers() -> list[tuple[dict, dict]]:
    return [(w, c) for w, c in containers() if c.get("command", [""])[0] == "pagedserve"]


def container_id(item: tuple[dict, dict]) -> str:
    return f"{item[0]['metadata']['name']}/{item[1]['name']}"


def flags(container: dict) -> dict[str, str]:
    args = container["command"][2:]
    return dict(zip(args[::2], args[1::2], strict=True))


def port_number(container: dict, port: int | str) -> int:
    """A probe's or Service's port (a number, or the name of one of the container's ports)."""
    by_name = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    return by_name[port] if isinstance(port, str) else port


def selects(service: dict, workload: dict) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def config_map_keys() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d["data"]) for d in ALL if d["kind"] == "ConfigMap"}


def secret_keys() -> dict[str, set[str]]:
    return {
        d["metadata"]["name"]: set(d.get("stringData", d.get("data", {})))
        for d in ALL
        if d["kind"] == "Secret"
    }


def env_values(container: dict) -> dict[str, str]:
    """What each variable the container can reference expands to, with stand-ins for values
    only a cluster knows (the pod's name and IP, a Secret's content, a label)."""
    values: dict[str, str] = {}
    maps = {d["metadata"]["name"]: d["data"] for d in ALL if d["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        values.update(maps[source["configMapRef"]["name"]])
    stand_ins = {"metadata.name": "pool-0", "status.podIP": "10.0.0.7"}
    for var in container.get("env", []):
        if "value" in var:
            values[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            values[var["name"]] = stand_ins.get(path, "0" if "pod-index" in path else "x")
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            assert ref["key"] in secret_keys()[ref["name"]], (
                f"{var['name']}: no key {ref['key']} in {ref['name']}"
            )
            values[var["name"]] = "redis://redis:6379/0"
        else:
            ref = source["configMapKeyRef"]
            values[var["name"]] = maps[ref["name"]][ref["key"]]
    return values


def expand(argv: list[str], values: dict[str, str]) -> list[str]:
    def one(match: re.Match) -> str:
        assert match[1] in values, f"$({match[1]}) is not defined in the container's env"
        return values[match[1]]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg) for arg in argv]


# --- the schemas ------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "doc", ALL, ids=[f"{p.relative_to(DEPLOY)}:{d['kind']}/{d['metadata']['name']}" for p, d in DOCS]
)
def test_manifest_matches_the_kubernetes_schema(doc, version):
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(
            f"{doc['kind']}/{doc['metadata']['name']} at {'.'.join(map(str, exc.path))}: {exc.message}"
        )


def test_the_validator_refuses_a_misspelled_field():
    """The check above has teeth: strict validation fails an unknown field."""
    pool = named("StatefulSet", "pool")
    broken = yaml.safe_load(yaml.safe_dump(pool))
    container = pod_spec(broken)["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_base_manifest():
    assert sorted(KUSTOMIZATION["resources"]) == sorted(
        str(p.relative_to(DEPLOY)) for p in MANIFEST_FILES if p.parent.name == "k8s"
    )
    used = {c["image"] for _, c in containers() if c["image"] != "redis:7-alpine"}
    assert used == {image["name"] for image in KUSTOMIZATION["images"]}


def test_names_are_unique():
    keys = [(d["kind"], d["metadata"]["name"]) for d in ALL]
    assert len(keys) == len(set(keys))


# --- Services, ports and addresses ------------------------------------------------------


@pytest.mark.parametrize(
    "service", [d for d in ALL if d["kind"] == "Service"], ids=lambda d: d["metadata"]["name"]
)
def test_service_selects_pods_whose_containers_have_its_ports(service):
    targets = [w for w in workloads() if selects(service, w)]
    assert len(targets) == 1, f"service {service['metadata']['name']} selects {len(targets)} workloads"
    (workload,) = targets
    assert workload["metadata"]["labels"] == workload["spec"]["template"]["metadata"]["labels"]
    assert (
        workload["spec"]["selector"]["matchLabels"].items()
        <= workload["spec"]["template"]["metadata"]["labels"].items()
    )
    if workload["kind"] == "StatefulSet":
        assert workload["spec"]["serviceName"] == service["metadata"]["name"]
    exposed = {
        p["containerPort"]: p.get("name")
        for c in pod_spec(workload)["containers"]
        for p in c.get("ports", [])
    }
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        if isinstance(target, str):
            assert target in exposed.values(), (service["metadata"]["name"], target)
            number = next(n for n, name in exposed.items() if name == target)
        else:
            number = target
        assert number in exposed and number == port["port"], (service["metadata"]["name"], port)


def services_by_name() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in ALL if d["kind"] == "Service"}


def resolve(address: str, workload: dict, container: dict) -> tuple[dict, int]:
    """The workload and port a host:port dialed from `container` reaches: a Service name, a
    StatefulSet pod's name under its headless Service (pod.service), or 127.0.0.1 (the pod)."""
    host, port = address.rsplit(":", 1)
    if host == "127.0.0.1":
        return workload, int(port)
    service = services_by_name()[host.split(".")[-1]]
    if "." in host:
        pod, svc = host.split(".")
        assert service["spec"].get("clusterIP") == "None", f"{host}: pod names need a headless Service"
        assert service["spec"].get("publishNotReadyAddresses") is True
        sts = named("StatefulSet", re.sub(r"-(\d+|\$\(POOL_INDEX\))$", "", pod))
        assert sts["spec"]["serviceName"] == svc
    assert int(port) in [p["port"] for p in service["spec"]["ports"]], address
    (target,) = [w for w in workloads() if selects(service, w)]
    return target, int(port)


def listening_port(container: dict) -> list[int]:
    f = flags(container)
    return [int(f[k]) for k in ("--port", "--grpc-port", "--http-port") if k in f]


def listener(workload: dict, port: int) -> dict:
    """The container of `workload` that listens on `port` (by its flags and its ports)."""
    found = [c for c in pod_spec(workload)["containers"] if port in listening_port(c)]
    assert len(found) == 1, f"{workload['metadata']['name']}: {len(found)} containers listen on {port}"
    assert port in [p["containerPort"] for p in found[0]["ports"]]
    return found[0]


@pytest.mark.parametrize("item", pagedserve_containers(), ids=container_id)
def test_command_is_a_pagedserve_subcommand_its_parser_accepts(item, monkeypatch):
    workload, container = item
    command = container["command"]
    assert command[0] == "pagedserve" and command[1] in SUBCOMMANDS
    values = env_values(container)
    for name, value in values.items():  # what `--redis-url env:NAME` reads in the container
        monkeypatch.setenv(name, value)
    argv = expand(command[1:], values)
    try:
        args = build_parser(command[1]).parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`pagedserve {' '.join(argv)}` is refused by its parser (exit {exc.code})")
    # The ports it listens on are the container's ports, and it listens on every interface.
    assert sorted(listening_port(container)) == sorted(p["containerPort"] for p in container["ports"])
    assert args.host == "0.0.0.0"


ROLE_OF_FLAG = {"--executor": "executor", "--tokenizer": "tokenizer", "--scheduler": "scheduler"}


@pytest.mark.parametrize("item", pagedserve_containers(), ids=container_id)
def test_addresses_dialed_reach_the_right_service(item):
    workload, container = item
    values = env_values(container)
    for flag, role in ROLE_OF_FLAG.items():
        for address in flags(container).get(flag, "").split(","):
            if not address:
                continue
            target, port = resolve(
                expand([address], {**values, "POOL_INDEX": "$(POOL_INDEX)"})[0], workload, container
            )
            assert listener(target, port)["command"][1] == role, (flag, address)


def test_gateway_discovers_the_pools_in_redis():
    """No static pool list: every gateway finds every pool (and a standby that takes one over)
    in the registry the schedulers write, at the same Redis."""
    (container,) = pod_spec(named("Deployment", "gateway"))["containers"]
    f = flags(container)
    assert "--scheduler" not in f and f["--redis-url"] == "env:REDIS_URL"
    for workload, scheduler in pagedserve_containers():
        if scheduler["command"][1] == "scheduler":
            assert env_source(scheduler, "REDIS_URL") == env_source(container, "REDIS_URL"), container_id(
                (workload, scheduler)
            )


def test_redis_url_points_at_the_redis_service():
    (secret,) = [d for d in BASE if d["kind"] == "Secret"]
    url = secret["stringData"]["url"]
    password, host, port = re.fullmatch(r"redis://:([^@]+)@([^:/]+):(\d+)/\d+", url).groups()
    assert password == secret["stringData"]["password"], "the URL carries the password Redis requires"
    service = services_by_name()[host]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    (target,) = [w for w in workloads() if selects(service, w)]
    assert pod_spec(target)["containers"][0]["image"].startswith("redis:")
    for _, container in pagedserve_containers():
        if "--redis-url" in flags(container):
            # read from the environment, not expanded into the command line (`ps` shows that)
            assert flags(container)["--redis-url"] == "env:REDIS_URL"


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


def env_source(container: dict, name: str) -> dict:
    (var,) = [v for v in container.get("env", []) if v["name"] == name]
    return var["valueFrom"]


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
