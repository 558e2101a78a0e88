"""The deploy/ manifests, loaded once, and the readers the manifest tests share: workloads,
their pod specs and containers, a container's flags and what its environment expands to (with
stand-ins for values only a cluster knows), and the ConfigMaps and Secrets they read.

Kept out of the test modules so that both can import it by a unique name.
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import yaml

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
            if ref.get("optional") is True and ref["name"] not in secret_keys():
                continue  # a Secret the operator may create (the API key): absent, the variable is unset
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


def env_source(container: dict, name: str) -> dict:
    (var,) = [v for v in container.get("env", []) if v["name"] == name]
    return var["valueFrom"]
