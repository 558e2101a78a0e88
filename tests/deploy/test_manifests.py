"""deploy/: every Kubernetes manifest against the Kubernetes OpenAPI schemas (strict: an
unknown or misspelled field fails), and the references between them: Service selectors and
ports against the pods they select, every container command against the pagedserve
subcommand's own parser, the addresses services dial against the Services and ports that
answer there, and the Redis URL every container reads (probes, the pool id and advertised
address, the GPU request, Redis persistence, the ConfigMap, and the HPA's metric:
test_manifest_workloads.py)."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml
from deploy_manifests import (
    ALL,
    BASE,
    DEPLOY,
    DOCS,
    K8S_VERSIONS,
    KUSTOMIZATION,
    MANIFEST_FILES,
    container_id,
    containers,
    env_source,
    env_values,
    expand,
    flags,
    named,
    pagedserve_containers,
    pod_spec,
    selects,
    workloads,
)

from pagedserve.cli import SUBCOMMANDS, build_parser

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


def test_gateways_take_an_optional_api_key_secret():
    """Absent, the gateways are open (as before); created, they all require its key."""
    (container,) = pod_spec(named("Deployment", "gateway"))["containers"]
    (var,) = [v for v in container["env"] if v["name"] == "PAGEDSERVE_API_KEY"]
    ref = var["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"], ref["optional"]) == ("pagedserve-api-key", "key", True)
    assert "--api-key" not in flags(container), "the key stays off the command line"


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
