"""--tls-cert/--tls-key: the gateway's HTTP and gRPC servers (as `serve` builds them) speak TLS,
and the SDK talks to them with the CA it is given. A self-signed certificate is made with the
`openssl` command for each test."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from gateway_fakes import FakeScheduler, FakeTokenizer

from pagedserve.client import AsyncClient
from pagedserve.common import errors
from pagedserve.common.redis_harness import free_ports
from pagedserve.gateway.config import GatewayConfig
from pagedserve.gateway.engine import Engine
from pagedserve.gateway.grpc_service import GatewayServicer
from pagedserve.gateway.metrics import GatewayMetrics
from pagedserve.gateway.server import TlsGrpcServer, grpc_server_for, http_server
from pagedserve.v1 import gateway_pb2_grpc


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def test_https_and_grpc_over_tls(certificate: tuple[str, str]) -> None:
    cert, key = certificate

    http_port, grpc_port = free_ports(2)

    async def scenario() -> None:
        config = GatewayConfig(
            host="127.0.0.1",
            http_port=http_port,
            grpc_port=grpc_port,
            model="m",
            tls_cert=cert,
            tls_key=key,
        )
        engine = Engine(config, FakeTokenizer(), FakeScheduler(["ok"]))
        http = http_server(engine, GatewayMetrics())
        http_task = asyncio.create_task(http.serve())
        grpc_server = grpc_server_for(config)
        assert isinstance(grpc_server, TlsGrpcServer)
        grpc_server.add(
            gateway_pb2_grpc.add_GatewayServicer_to_server, GatewayServicer(engine), "pagedserve.v1.Gateway"
        )
        port = await grpc_server.start()
        while not http.started:
            await asyncio.sleep(0.01)
        try:
            trust = ssl.create_default_context(cafile=cert)
            async with httpx.AsyncClient(
                base_url=f"https://127.0.0.1:{config.http_port}", verify=trust
            ) as client:
                reply = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "ok"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{config.http_port}") as plain:
                with pytest.raises(httpx.HTTPError):
                    await plain.get("/health")

            root = Path(cert).read_bytes()
            async with AsyncClient(f"localhost:{port}", timeout=10, root_certificates=root) as sdk:
                assert (await sdk.generate("x", max_tokens=2)).choices[0].text == "ok"
            async with AsyncClient(f"localhost:{port}", timeout=5) as plaintext:
                with pytest.raises(errors.PagedServeError):
                    await plaintext.generate("x", max_tokens=2)
        finally:
            await grpc_server.stop(grace=0.5)
            http.should_exit = True
            await http_task

    asyncio.run(scenario())


def test_tls_flags_go_together(certificate: tuple[str, str]) -> None:
    from test_gateway_config import parse

    cert, key = certificate
    assert parse("--model", "m", "--tls-cert", cert, "--tls-key", key).tls_cert == cert
    with pytest.raises(SystemExit, match="--tls-cert and --tls-key go together"):
        parse("--model", "m", "--tls-cert", cert)
    with pytest.raises(SystemExit, match="TLS file not found: /nope.pem"):
        parse("--model", "m", "--tls-cert", "/nope.pem", "--tls-key", key)
