"""What `pagedserve up` would start: flags to config, config to each service's command line
(checked against the service's own parser once the service exists), and what is skipped."""

from __future__ import annotations

import argparse
import socket

import pytest

from pagedserve.cli import SUBCOMMANDS, build_parser
from pagedserve.common.models import default_model
from pagedserve.launch_checks import ports_in_use
from pagedserve.launch_plan import (
    PAGEDSERVE,
    LauncherConfig,
    default_placement,
    module_available,
    plan,
    service_env,
)

SERVICES = ("executor", "tokenizer", "scheduler", "gateway")
EVERY_OPTION = dict(
    model="/models/m",
    num_kv_blocks=64,
    max_num_seqs=8,
    max_num_batched_tokens=512,
    max_model_len=256,
    max_queued_requests=32,
    attention_backend="torch",
    dtype="float32",
    swap_space=0.5,
    gpu_memory_utilization=0.8,
    seed=7,
    request_timeout=120.0,
    reasoning_parser="qwen3",
    preemption_mode="swap",
    chat_template="{% for m in messages %}{{ m.content }}{% endfor %}",
    generation_config="vllm",
    allowed_origins=("https://ui.example.com",),
    gateway_limits=(("--max-n", 4), ("--max-beam-width", 2), ("--read-timeout", 2.5)),
)


def parse_up(*argv: str) -> argparse.Namespace:
    return build_parser("up").parse_args(["up", *argv])


def flags(command: tuple[str, ...]) -> dict[str, str]:
    """`--flag value` pairs of a command line after the subcommand."""
    rest = command[len(PAGEDSERVE) + 1 :]
    return dict(zip(rest[::2], rest[1::2], strict=True))


def test_flag_defaults_are_the_config_defaults():
    assert LauncherConfig.from_args(parse_up()) == LauncherConfig(model=default_model())


def test_flags_reach_the_config():
    args = parse_up(
        "--host", "0.0.0.0", "--http-port", "9000", "--kv-cache-memory", "2GiB", "--max-num-seqs", "4"
    )
    config = LauncherConfig.from_args(args)
    assert (config.host, config.http_port, config.kv_cache_memory, config.max_num_seqs) == (
        "0.0.0.0",
        9000,
        2 << 30,
        4,
    )
    assert config.connect_host == "127.0.0.1"


def test_swap_flags_reach_the_executor_and_the_scheduler():
    config = LauncherConfig.from_args(parse_up("--swap-space", "0.25", "--preemption-mode", "recompute"))
    assert (config.swap_space, config.preemption_mode) == (0.25, "recompute")
    specs, _ = plan(config, "redis://r", available=lambda name: True)
    by_name = {s.name: flags(s.command) for s in specs}
    assert by_name["executor"]["--swap-space"] == "0.25"
    assert by_name["scheduler"]["--preemption-mode"] == "recompute"
    assert "--swap-space" not in flags(
        plan(LauncherConfig(model="m"), "redis://r", available=lambda n: True)[0][0].command
    )


def test_chat_template_reaches_the_tokenizer(tmp_path, monkeypatch):
    def tokenizer_flags(config: LauncherConfig) -> dict[str, str]:
        specs, _ = plan(config, "redis://r", available=lambda name: True)
        return flags(next(s for s in specs if s.name == "tokenizer").command)

    (tmp_path / "t.jinja").write_text("{{ messages[0].content }}")
    monkeypatch.chdir(tmp_path)
    config = LauncherConfig.from_args(parse_up("--chat-template", "t.jinja"))
    assert tokenizer_flags(config)["--chat-template"] == str(tmp_path / "t.jinja")  # a file, made absolute
    inline = LauncherConfig(model="m", chat_template="{{ messages[0].content }}")
    assert tokenizer_flags(inline)["--chat-template"] == "{{ messages[0].content }}"
    assert "--chat-template" not in tokenizer_flags(LauncherConfig(model="m"))
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        LauncherConfig(model="m", chat_template="missing.jinja")


def test_generation_config_and_origins_reach_the_gateway(tmp_path, monkeypatch):
    def gateway_flags(config: LauncherConfig) -> dict[str, str]:
        specs, _ = plan(config, "redis://r", available=lambda name: True)
        return flags(next(s for s in specs if s.name == "gateway").command)

    assert "--generation-config" not in gateway_flags(LauncherConfig(model="m"))
    assert (
        gateway_flags(LauncherConfig.from_args(parse_up("--generation-config", "vllm")))[
            "--generation-config"
        ]
        == "vllm"
    )
    two = LauncherConfig.from_args(parse_up("--allowed-origins", "https://a.example", "*"))
    gateway = next(s for s in plan(two, "redis://r", available=lambda name: True)[0] if s.name == "gateway")
    assert "--allowed-origins https://a.example *" in " ".join(gateway.command)
    (tmp_path / "tuned").mkdir()
    monkeypatch.chdir(tmp_path)
    folder = LauncherConfig.from_args(parse_up("--generation-config", "tuned"))
    assert gateway_flags(folder)["--generation-config"] == str(tmp_path / "tuned")  # made absolute


def test_the_api_key_reaches_the_gateway_in_its_environment_only():
    config = LauncherConfig.from_args(parse_up("--api-key", "s3cret"))
    specs, _ = plan(config, "redis://r", available=lambda name: True)
    assert all("s3cret" not in " ".join(s.command) for s in specs)
    envs = {s.name: service_env(config, s.name) for s in specs}
    assert envs["gateway"] == {"PYTHONUNBUFFERED": "1", "PAGEDSERVE_API_KEY": "s3cret"}
    assert all(env == {"PYTHONUNBUFFERED": "1"} for name, env in envs.items() if name != "gateway")
    assert "PAGEDSERVE_API_KEY" not in service_env(LauncherConfig(model="m"), "gateway")


def test_executor_and_gateway_options_reach_their_commands():
    args = ("--seed", "7", "--gpu-memory-utilization", "0.5", "--request-timeout", "60", "--protect-metrics")
    specs, _ = plan(LauncherConfig.from_args(parse_up(*args)), "redis://r", available=lambda name: True)
    commands = {s.name: " ".join(s.command) for s in specs}
    assert "--gpu-memory-utilization 0.5" in commands["executor"] and "--seed 7" in commands["executor"]
    assert "--request-timeout 60.0" in commands["gateway"] and "--protect-metrics" in commands["gateway"]
    gateway = next(s for s in specs if s.name == "gateway")
    assert build_parser("gateway").parse_args(list(gateway.command[len(PAGEDSERVE) :])).protect_metrics
    bare = {
        s.name: s.command for s in plan(LauncherConfig(model="m"), "redis://r", available=lambda n: True)[0]
    }
    assert not {"--seed", "--gpu-memory-utilization"} & set(bare["executor"])
    assert not {"--request-timeout", "--protect-metrics"} & set(bare["gateway"])


def test_request_limits_reach_the_gateway():
    config = LauncherConfig.from_args(
        parse_up("--max-beam-width", "2", "--max-n", "4", "--read-timeout", "2.5", "--pools", "2")
    )
    assert config.gateway_limits == (("--max-n", 4), ("--max-beam-width", 2), ("--read-timeout", 2.5))
    specs, _ = plan(config, "redis://r", available=lambda name: True)
    (gateway,) = [flags(s.command) for s in specs if s.name == "gateway"]
    assert (gateway["--max-n"], gateway["--max-beam-width"], gateway["--read-timeout"]) == ("4", "2", "2.5")
    assert "--max-json-depth" not in gateway, "not given: the gateway's own default"
    # Checked by `up` itself, before anything starts, with the gateway's own words.
    with pytest.raises(ValueError, match=r"--max-json-depth must be >= 2 \(a body is an object of lists\)"):
        LauncherConfig.from_args(parse_up("--max-json-depth", "1"))
    with pytest.raises(ValueError, match="--max-beam-width must be >= 1"):
        LauncherConfig.from_args(parse_up("--max-beam-width", "0"))


def test_restart_flags_reach_the_config():
    defaults = LauncherConfig.from_args(parse_up())
    assert (defaults.restart, defaults.max_restarts, defaults.restart_window) == (True, 5, 60.0)
    assert defaults.restart_policy.backoff == 0.5 and defaults.restart_policy.max_backoff == 10.0
    config = LauncherConfig.from_args(
        parse_up("--no-restart", "--max-restarts", "0", "--restart-window", "5")
    )
    assert (config.restart, config.max_restarts, config.restart_window) == (False, 0, 5.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--num-kv-blocks", "8", "--kv-cache-memory", "1GiB"],
        ["--num-kv-blocks", "0"],
        ["--kv-cache-memory", "lots"],
        ["--attention-backend", "cuda"],
        ["--max-restarts", "-1"],
    ],
)
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_up(*argv)


def test_config_refuses_contradictions():
    with pytest.raises(ValueError, match="not both"):
        LauncherConfig(model="m", num_kv_blocks=8, kv_cache_memory=1 << 30)
    with pytest.raises(ValueError, match="ports must differ"):
        LauncherConfig(model="m", tokenizer_port=50053)
    with pytest.raises(ValueError, match="--restart-window"):
        LauncherConfig(model="m", restart_window=0)
    with pytest.raises(ValueError, match="restart backoff"):
        LauncherConfig(model="m", restart_backoff=20.0)


def test_plan_orders_and_wires_every_service():
    config = LauncherConfig(**EVERY_OPTION)
    specs, skipped = plan(config, "redis://127.0.0.1:6390/0", available=lambda name: True)
    assert skipped == {}
    assert [(s.name, s.tier) for s in specs] == [
        ("executor", 0),
        ("tokenizer", 0),
        ("scheduler", 1),
        ("gateway", 2),
    ]
    by_name = {s.name: s for s in specs}
    assert all(s.command[: len(PAGEDSERVE) + 1] == (*PAGEDSERVE, s.name) for s in specs)
    assert flags(by_name["executor"].command) == {
        "--host": "127.0.0.1",
        "--port": "50054",
        "--model": "/models/m",
        "--block-size": "16",
        "--num-kv-blocks": "64",
        "--max-model-len": "256",
        "--max-num-batched-tokens": "512",
        "--dtype": "float32",
        "--attention-backend": "torch",
        "--swap-space": "0.5",
        "--gpu-memory-utilization": "0.8",
        "--seed": "7",
    }
    assert flags(by_name["scheduler"].command) == {
        "--host": "127.0.0.1",
        "--port": "50053",
        "--executor": "127.0.0.1:50054",
        "--redis-url": "redis://127.0.0.1:6390/0",
        "--max-num-seqs": "8",
        "--max-model-len": "256",
        "--max-num-batched-tokens": "512",
        "--max-queued-requests": "32",
        "--preemption-mode": "swap",
    }
    assert flags(by_name["gateway"].command) == {
        "--host": "127.0.0.1",
        "--grpc-port": "50051",
        "--http-port": "8000",
        "--tokenizer": "127.0.0.1:50052",
        "--scheduler": "127.0.0.1:50053",
        "--kv-map-redis-url": "redis://127.0.0.1:6390/0",
        "--model": "/models/m",
        "--max-queued-requests": "32",
        "--generation-config": "vllm",
        "--allowed-origins": "https://ui.example.com",
        "--request-timeout": "120.0",
        "--reasoning-parser": "qwen3",
        "--max-n": "4",
        "--max-beam-width": "2",
        "--read-timeout": "2.5",
    }
    assert flags(by_name["tokenizer"].command) == {
        "--host": "127.0.0.1",
        "--port": "50052",
        "--model": "/models/m",
        "--chat-template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    }
    assert by_name["gateway"].health_address == "127.0.0.1:50051"
    assert by_name["gateway"].ports == (50051, 8000)


def test_unset_options_are_left_to_the_services():
    specs, _ = plan(
        LauncherConfig(model="m", kv_cache_memory=1 << 30), "redis://r", available=lambda name: True
    )
    executor = flags(specs[0].command)
    assert executor["--kv-cache-memory"] == str(1 << 30)
    assert not {"--num-kv-blocks", "--dtype", "--max-model-len", "--attention-backend"} & executor.keys()


def test_missing_service_skips_what_needs_it():
    specs, skipped = plan(LauncherConfig(model="m"), "redis://r", available=lambda name: name != "executor")
    assert [s.name for s in specs] == ["tokenizer"]
    assert skipped == {
        "executor": "module pagedserve.executor.server not found",
        "scheduler": "needs executor",
        "gateway": "needs scheduler",
    }


def test_wildcard_host_is_reached_through_loopback():
    specs, _ = plan(LauncherConfig(model="m", host="0.0.0.0"), "redis://r", available=lambda name: True)
    gateway = flags(specs[-1].command)
    assert gateway["--host"] == "0.0.0.0" and gateway["--tokenizer"] == "127.0.0.1:50052"
    assert specs[-1].health_address == "127.0.0.1:50051"


@pytest.mark.parametrize("service", SERVICES)
def test_command_is_accepted_by_the_services_own_parser(service):
    if not module_available(service):
        pytest.skip(f"{SUBCOMMANDS[service][0]} does not exist yet")
    specs, _ = plan(LauncherConfig(**EVERY_OPTION), "redis://127.0.0.1:6390/0", available=lambda name: True)
    (spec,) = [s for s in specs if s.name == service]
    argv = list(spec.command[len(PAGEDSERVE) :])
    try:
        build_parser(service).parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`pagedserve {' '.join(argv)}` is refused by {service}'s parser (exit {exc.code})")
    # --kv-cache-memory is the other branch of the pool-size choice.
    if service == "executor":
        specs, _ = plan(
            LauncherConfig(model="m", kv_cache_memory=1 << 30), "redis://r", available=lambda n: True
        )
        build_parser(service).parse_args(list(specs[0].command[len(PAGEDSERVE) :]))


def test_ports_in_use_sees_a_listener_only():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            free = other.getsockname()[1]
        assert ports_in_use("127.0.0.1", [busy, free]) == [busy]


def test_default_placement_pins_the_executor_to_all_cores_but_the_last() -> None:
    # On a CPU machine with 2+ cores: the executor on all cores but the last (the other services
    # get the last one, see Launcher._place), heavy steps on every core; the executor's command
    # carries it. Anything that says otherwise keeps the config as it is.
    config = LauncherConfig(model=default_model())
    placed, line = default_placement(config, (0, 1), cuda=lambda: False)
    assert (placed.cpu_affinity, placed.prefill_threads) == ("0", 2) and "pinned to cores 0" in line
    executor = next(s for s in plan(placed, "redis://x:1").specs if s.name == "executor")
    assert flags(executor.command)["--cpu-affinity"] == "0"
    assert flags(executor.command)["--prefill-threads"] == "2"
    placed, _ = default_placement(config, (2, 3, 4, 5), cuda=lambda: False)
    assert (placed.cpu_affinity, placed.prefill_threads) == ("2-4", 4)
    placed, _ = default_placement(
        LauncherConfig(model=default_model(), prefill_threads=3), (0, 1), cuda=lambda: False
    )
    assert placed.prefill_threads == 3
    for kept, cores, cuda in [
        (config, (0,), False),  # one core: nothing to leave to the others
        (config, (0, 1), True),  # CUDA: the host threads only feed the device
        (LauncherConfig(model=default_model(), cpu_threads=2), (0, 1), False),
        (LauncherConfig(model=default_model(), cpu_affinity="1"), (0, 1), False),
        (LauncherConfig(model=default_model(), pools=2), (0, 1, 2, 3), False),
    ]:
        assert default_placement(kept, cores, lambda cuda=cuda: cuda) == (kept, "")
