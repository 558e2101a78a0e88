"""Transport security of `pagedserve up` as real processes: `--internal-tls` makes a throwaway
CA and certificate and every internal gRPC link (gateway → tokenizer and scheduler, scheduler
→ executor) uses mutual TLS, on a password-protected Redis; a client without a certificate is
refused by every internal service, and `--api-key` protects the gateway without showing on a
service's command line. A wrong Redis password is a clear error at start-up, from
`pagedserve up` and from a scheduler alone, and never printed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from test_up import (  # noqa: F401  (launch: a fixture)
    complete,
    launch,
    marked_processes,
    port_flags,
    start_small_stack,
)

from pagedserve.common.grpc_utils import health_check
from pagedserve.common.internal_tls import InternalTLS, load
from pagedserve.common.redis_topologies import LocalRedis
from pagedserve.v1 import executor_pb2, executor_pb2_grpc

PASSWORD = "pagedserve-test-secret"
API_KEY = "pagedserve-test-api-key"


def test_up_with_internal_mtls_on_a_password_protected_redis(launch, up_model, monkeypatch) -> None:  # noqa: F811
    with LocalRedis(password=PASSWORD) as server:
        # The URL named by an environment variable: no command line carries the password, not
        # `up`'s and not its services' (they get it in their environment too).
        monkeypatch.setenv("TEST_REDIS_URL", server.url)
        # --api-key on up's command line (the test's choice) reaches the gateway in its environment
        up, http_url = start_small_stack(
            launch, up_model, "--internal-tls", "--redis-url", "env:TEST_REDIS_URL", "--api-key", API_KEY
        )
        stack = [up.proc.pid, *marked_processes(up.marker)]
        assert len(stack) >= 5, stack  # up, executor, tokenizer, scheduler, gateway
        for pid in stack:
            assert PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
            if pid != up.proc.pid:
                assert API_KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
        # /ready asks the tokenizer and the scheduler over mutual TLS (the first handshakes can
        # take seconds on a loaded machine).
        deadline = time.monotonic() + 60
        while (ready := httpx.get(f"{http_url}/ready", timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.5)
        assert ready.json() == {"tokenizer": True, "scheduler": True}
        assert complete(http_url).status_code == 401, "the gateway took a call without the key"
        body = {"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}
        auth = {"Authorization": f"Bearer {API_KEY}"}
        reply = httpx.post(f"{http_url}/v1/completions", json=body, headers=auth, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
        out = up.output()
        assert PASSWORD not in out and API_KEY not in out, out
        cert_dir = Path(re.search(r"a throwaway CA and certificate in (\S+)", out)[1])
        full = load(
            str(cert_dir / "service.pem"), str(cert_dir / "service-key.pem"), str(cert_dir / "ca.pem")
        )
        no_cert = InternalTLS(ca=full.ca)
        internal = {
            m[1]: m[2] for m in re.finditer(r"(executor|tokenizer|scheduler) is serving at (\S+)", out)
        }
        assert sorted(internal) == ["executor", "scheduler", "tokenizer"], out
        for name, address in internal.items():
            assert health_check(address, timeout=5.0, tls=full), (
                f"{name} refuses a client with the certificate"
            )
            assert not health_check(address, timeout=2.0, tls=no_cert), (
                f"{name} took a client without a certificate"
            )
            assert not health_check(address, timeout=2.0, tls=InternalTLS()), (
                f"{name} took a plaintext client"
            )

        # A real call, not only the health service: the executor refuses it at the handshake.
        with grpc.secure_channel(internal["executor"], no_cert.channel_credentials()) as channel:
            try:
                executor_pb2_grpc.ExecutorStub(channel).Info(executor_pb2.ExecutorInfoRequest(), timeout=3.0)
                raise AssertionError("the executor answered a client without a certificate")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err


def test_up_refuses_a_wrong_redis_password(launch) -> None:  # noqa: F811
    with LocalRedis(password=PASSWORD) as server:
        wrong = server.url.replace(PASSWORD, "not-the-password")
        argv, _ = port_flags()
        up = launch("--model", "unused", *argv, "--redis-url", wrong)
        assert up.wait(60) == 1, up.output()
        out = up.output()
        assert "refused the credentials" in out and "redis://:***@127.0.0.1" in out, out
        assert "not-the-password" not in out and "started" not in out, out


@pytest.mark.parametrize(
    "argv",
    [
        ["scheduler", "--port", "0", "--executor", "127.0.0.1:1"],
        ["gateway", "--grpc-port", "0", "--http-port", "0", "--tokenizer", "127.0.0.1:1"],
    ],
    ids=["scheduler", "gateway"],
)
def test_a_service_refuses_a_wrong_redis_password(argv: list[str]) -> None:
    with LocalRedis(password=PASSWORD) as server:
        wrong = server.url.replace(PASSWORD, "not-the-password")
        done = subprocess.run(
            [sys.executable, "-m", "pagedserve.cli", *argv, "--redis-url", wrong],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        out = done.stdout + done.stderr
        assert done.returncode == 1, out
        assert "refused the credentials" in out and "not-the-password" not in out, out
        assert "Traceback" not in out, out
