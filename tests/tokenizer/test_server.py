"""`pagedserve tokenizer`: flags and environment into a frozen config, and the real command
as a subprocess that becomes SERVING and exits cleanly on SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from pagedserve.common.grpc_utils import health_check
from pagedserve.common.models import default_model
from pagedserve.common.redis_harness import free_port
from pagedserve.tokenizer import server
from pagedserve.tokenizer.servicer import SERVICE_NAME
from pagedserve.v1 import tokenizer_pb2 as pb
from pagedserve.v1 import tokenizer_pb2_grpc


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    return parser.parse_args(argv)


def test_config_defaults_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PAGEDSERVE_MODEL", "PAGEDSERVE_TOKENIZER_PORT", "PAGEDSERVE_TOKENIZER_MAX_INPUT_BYTES"):
        monkeypatch.delenv(name, raising=False)
    config = server.TokenizerConfig.from_args(parse([]))
    assert config == server.TokenizerConfig(
        model=default_model(), host="0.0.0.0", port=50052, max_input_bytes=1 << 20
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]

    monkeypatch.setenv("PAGEDSERVE_MODEL", "/models/x")
    monkeypatch.setenv("PAGEDSERVE_TOKENIZER_PORT", "6000")
    monkeypatch.setenv("PAGEDSERVE_TOKENIZER_MAX_INPUT_BYTES", "99")
    from_env = server.TokenizerConfig.from_args(parse([]))
    assert (from_env.model, from_env.port, from_env.max_input_bytes) == ("/models/x", 6000, 99)
    flags = server.TokenizerConfig.from_args(parse(["--model", "m", "--port", "7", "--max-input-bytes", "5"]))
    assert (flags.model, flags.port, flags.max_input_bytes) == ("m", 7, 5)


def test_main_fails_cleanly_without_a_tokenizer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert server.main(parse(["--model", str(tmp_path / "missing"), "--port", "0"])) == 1
    assert "could not load the tokenizer" in caplog.text
    assert server.main(parse(["--model", str(tmp_path), "--max-input-bytes", "0"])) == 2


def pagedserve_command() -> list[str]:
    script = Path(sys.executable).with_name("pagedserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pagedserve.cli"]


def test_command_serves_until_sigterm(tokenizer_dirs: dict[str, Path]) -> None:
    port = free_port()
    model = str(tokenizer_dirs["byte_level"])
    proc = subprocess.Popen(
        [*pagedserve_command(), "tokenizer", "--port", str(port), "--model", model],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PAGEDSERVE_LOG_LEVEL": "INFO"},
    )
    try:
        deadline = time.monotonic() + 120  # imports transformers on a busy machine
        while not health_check(f"127.0.0.1:{port}", SERVICE_NAME):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the tokenizer never became SERVING"
            time.sleep(0.2)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = tokenizer_pb2_grpc.TokenizerStub(channel).Info(pb.TokenizerInfoRequest(), timeout=10)
        assert info.model == Path(model).name
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        assert f"listening on 0.0.0.0:{port}" in stderr
        assert "tokenizer stopped" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
