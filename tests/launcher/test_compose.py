"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the structure,
each command against the service's own parser and against what `pagedserve up` runs, the
two pools (executor-N + scheduler-N, each its own pool id and advertised address, one Redis),
the ports, the health checks (each probe is run for real against a stand-in service), and
the start order."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pagedserve.cli import SUBCOMMANDS, build_parser
from pagedserve.common.models import REPO_ROOT
from pagedserve.common.redis_harness import free_port
from pagedserve.launch_plan import PAGEDSERVE, LauncherConfig, module_available, plan

ROLES = ("executor", "tokenizer", "scheduler", "gateway")
NUM_POOLS = 2
POOLS = [(f"executor-{n}", f"scheduler-{n}") for n in range(NUM_POOLS)]
APP_SERVICES = (*(name for pool in POOLS for name in pool), "tokenizer", "gateway")
# Flags a pool's scheduler takes that `pagedserve up`'s single pool leaves at their defaults.
POOL_FLAGS = {"--pool-id", "--advertise-address"}
COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DEFAULTS = LauncherConfig(model="unused", pools=NUM_POOLS)
# What `pagedserve up --pools 2` runs: pool 0 is "executor"/"scheduler", pool 1 "executor-1"/...
LAUNCHER = {
    spec.name: spec for spec in plan(DEFAULTS, "redis://redis:6379/0", available=lambda name: True).specs
}
FAKE = str(Path(__file__).with_name("fake_service.py"))
# Every service's Redis URL carries the password Redis is started with (compose interpolates it).
PASSWORD = "${PAGEDSERVE_REDIS_PASSWORD:-pagedserve-dev-password}"
REDIS_URL = f"redis://:{PASSWORD}@redis:6379/0"


def flags(argv: list[str]) -> dict[str, str]:
    return dict(zip(argv[::2], argv[1::2], strict=True))


def role(name: str) -> str:
    """The pagedserve service a compose service runs: scheduler-1 runs `pagedserve scheduler`."""
    return name.split("-")[0]


def compose_flags(name: str) -> dict[str, str]:
    return flags(SERVICES[name]["command"][2:])


def launcher_flags(name: str) -> dict[str, str]:
    ours = role(name) if name.endswith("-0") or "-" not in name else name
    return flags(list(LAUNCHER[ours].command[len(PAGEDSERVE) + 1 :]))


def test_services_and_images():
    assert set(SERVICES) == {"redis", *APP_SERVICES}
    assert SERVICES["redis"]["image"] == "redis:7-alpine"
    images = {SERVICES[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1, f"one image for every service, got {images}"
    assert all(SERVICES[name]["build"] == "." for name in APP_SERVICES)


def test_only_the_gateway_is_published():
    published = {name for name, service in SERVICES.items() if service.get("ports")}
    assert published == {"gateway"}
    assert sorted(SERVICES["gateway"]["ports"]) == sorted(
        [f"{DEFAULTS.http_port}:{DEFAULTS.http_port}", f"{DEFAULTS.grpc_port}:{DEFAULTS.grpc_port}"]
    )
    assert COMPOSE["networks"]["backend"]["internal"] is True
    assert SERVICES["redis"]["networks"] == ["backend"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_command_is_what_pagedserve_up_runs(name):
    command = SERVICES[name]["command"]
    assert command[:2] == ["pagedserve", role(name)] and role(name) in SUBCOMMANDS
    ours, theirs = compose_flags(name), launcher_flags(name)
    extra = ours.keys() - theirs.keys() - (POOL_FLAGS if role(name) == "scheduler" else set())
    assert not extra, f"flags `pagedserve up` does not pass to {name}: {extra}"
    assert ours["--host"] == "0.0.0.0"
    if "--model" in theirs:
        assert ours["--model"] == "${PAGEDSERVE_MODEL:-/app/models/tiny-py}"
    for flag, value in ours.items():
        if flag == "--block-size" or (flag.endswith("port") and role(name) in ("tokenizer", "gateway")):
            assert value == theirs[flag], f"{name} {flag}: compose {value}, pagedserve up {theirs[flag]}"
        elif flag == "--port":  # every pool's services on the default ports, one container each
            assert value == str(getattr(DEFAULTS, f"{role(name)}_port")), (name, flag, value)
        elif flag in ("--executor", "--tokenizer", "--scheduler"):
            # The same port, reached by the service's name on the compose network: a pool's
            # scheduler drives its own executor (compose keeps every pool on the default ports,
            # each in its own container; `pagedserve up` shifts pool i's by 100 * i).
            peer = {"--executor": name.replace("scheduler", "executor")}
            expected = peer.get(flag, flag[2:])
            port = theirs[flag].rsplit(":", 1)[1] if flag != "--executor" else str(DEFAULTS.executor_port)
            assert value == f"{expected}:{port}", (name, flag, value)
    if role(name) in ("scheduler", "gateway"):
        assert ours["--redis-url"] == REDIS_URL


def test_two_pools_on_one_redis():
    """Each pool its own executor, pool id and advertised address; all on the one Redis."""
    pool_ids, redis_urls = set(), set()
    for n, (executor, scheduler) in enumerate(POOLS):
        assert SERVICES[executor]["command"][:2] == ["pagedserve", "executor"]
        ours = compose_flags(scheduler)
        assert ours["--executor"] == f"{executor}:{compose_flags(executor)['--port']}"
        assert ours["--pool-id"] == f"pool-{n}"
        assert ours["--advertise-address"] == f"{scheduler}:{ours['--port']}"
        pool_ids.add(ours["--pool-id"])
        redis_urls.add(ours["--redis-url"])
    assert len(pool_ids) == NUM_POOLS and redis_urls == {REDIS_URL}
    assert {role(name) for name in SERVICES} == {"redis", *ROLES}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_command_is_accepted_by_the_services_own_parser(name):
    if not module_available(role(name)):
        pytest.skip(f"{SUBCOMMANDS[role(name)][0]} does not exist yet")
    argv = SERVICES[name]["command"][1:]
    try:
        build_parser(role(name)).parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`pagedserve {' '.join(argv)}` is refused by {name}'s parser (exit {exc.code})")


def test_every_service_has_a_health_check():
    for name in APP_SERVICES:
        assert SERVICES[name]["healthcheck"]["test"][0] == "CMD", name
    assert SERVICES["redis"]["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]


def test_redis_requires_the_password_the_services_use():
    redis = SERVICES["redis"]
    assert redis["command"] == ["redis-server", "--requirepass", PASSWORD]
    assert redis["environment"]["REDISCLI_AUTH"] == PASSWORD  # for its health check


def test_redis_health_probe_needs_the_password():
    """The probe, run for real against a password-protected redis-server: healthy with the
    password in REDISCLI_AUTH, not with a wrong one (redis-cli itself exits 0 on NOAUTH)."""
    from pagedserve.common.redis_topologies import LocalRedis

    probe = SERVICES["redis"]["healthcheck"]["test"][1]
    with LocalRedis(password="s3cret") as server:
        env = {"PATH": os.environ["PATH"], "REDISCLI_PORT": str(server.port)}
        shell = f"redis-cli -p $REDISCLI_PORT {probe.removeprefix('redis-cli ')}"
        for auth, code in (("s3cret", 0), ("wrong", 1)):
            done = subprocess.run(["sh", "-c", shell], env={**env, "REDISCLI_AUTH": auth}, timeout=10)
            assert done.returncode == code, auth


@pytest.mark.parametrize("name", APP_SERVICES)
def test_health_probe_works(name):
    """Run the compose probe here, pointed at a free port: it fails while nothing listens
    and passes once a server there reports SERVING."""
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[1:3] == ["python", "-c"]
    probe = test[3]
    assert f"'127.0.0.1:{LAUNCHER[role(name)].health_address.rsplit(':', 1)[1]}'" in probe
    port = free_port()
    probe = re.sub(r"'127\.0\.0\.1:\d+'", f"'127.0.0.1:{port}'", probe)
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 1
    fake = subprocess.Popen([sys.executable, FAKE, "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and "fake serving" in fake.stdout.readline()
        assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0
    finally:
        fake.terminate()
        fake.wait(10)


def test_start_order_waits_for_health():
    # `pagedserve up`'s order, for every pool: scheduler-N needs executor-N (and Redis); a
    # need of "scheduler" is a need of every pool's scheduler.
    for name in APP_SERVICES:
        needs = set()
        for need in LAUNCHER[role(name)].needs:
            if role(need) == "executor":
                needs.add(name.replace("scheduler", "executor"))
            elif role(need) != "scheduler":  # the gateway finds the pools in Redis, as they come
                needs.add(need)
        if role(name) in ("scheduler", "gateway"):
            needs.add("redis")
        depends = SERVICES[name].get("depends_on", {})
        assert set(depends) == needs, name
        assert all(d["condition"] == "service_healthy" for d in depends.values()), name


def test_model_comes_from_the_environment():
    for name in APP_SERVICES:
        assert SERVICES[name]["environment"]["PAGEDSERVE_MODEL"] == "${PAGEDSERVE_MODEL:-/app/models/tiny-py}"


def test_the_gateway_takes_an_api_key_from_the_environment():
    # empty when unset: the gateway reads "" as no key (open)
    assert SERVICES["gateway"]["environment"]["PAGEDSERVE_API_KEY"] == "${PAGEDSERVE_API_KEY:-}"
    others = [name for name in APP_SERVICES if name != "gateway"]
    assert all("PAGEDSERVE_API_KEY" not in SERVICES[name]["environment"] for name in others)


def test_dockerfile_builds_one_image_that_runs_pagedserve():
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text
    assert re.search(r"make (gen-stubs|protos)|grpc_tools", text)
    assert re.search(r"pip install [^\n]*\.\s*$", text, re.M)
    assert re.search(r"^COPY models/ ", text, re.M)
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    assert json.loads(cmd)[:2] == ["pagedserve", "up"]
    ignored = {line.strip().rstrip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git"} <= ignored
    needed = {"pyproject.toml", "README.md", "Makefile", "protos", "services", "kernels", "bench", "models"}
    assert not needed & ignored
