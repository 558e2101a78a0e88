"""Internal mutual TLS in process: a `GrpcServer` given a certificate and a CA answers a client
that presents a certificate the CA signed, and refuses one without a certificate, one with a
certificate another CA signed, and a plaintext one. Bad flag combinations name the flag."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pagedserve.common.certs import make_ca, make_certs, sign
from pagedserve.common.grpc_utils import GrpcServer, health_check
from pagedserve.common.internal_tls import InternalTLS, load
from pagedserve.common.redis_harness import free_port


def test_only_clients_with_a_certificate_of_the_ca_get_in(tmp_path: Path) -> None:
    files = make_certs(tmp_path / "ours")
    tls = load(files.cert, files.key, files.ca)
    other_ca, other_key = make_ca(tmp_path / "theirs", "someone-else")
    stranger_cert, stranger_key = sign(tmp_path / "theirs", other_ca, other_key, "stranger")
    stranger = InternalTLS(Path(stranger_cert).read_bytes(), Path(stranger_key).read_bytes(), tls.ca)

    async def scenario() -> dict[str, bool]:
        server = GrpcServer("127.0.0.1", free_port(), tls=tls)
        port = await server.start()
        address = f"127.0.0.1:{port}"
        try:
            clients = {
                "ours": tls,
                "no cert": InternalTLS(ca=tls.ca),
                "stranger": stranger,
                "plain": InternalTLS(),
            }
            return {
                name: await asyncio.to_thread(health_check, address, timeout=3.0, tls=client)
                for name, client in clients.items()
            }
        finally:
            await server.stop(grace=0.1)

    assert asyncio.run(scenario()) == {"ours": True, "no cert": False, "stranger": False, "plain": False}


@pytest.mark.parametrize(
    ("cert", "key", "ca", "says"),
    [
        ("c", None, None, "--internal-tls-cert and --internal-tls-key go together"),
        (None, None, "ca", "--internal-tls-ca needs --internal-tls-cert"),
        ("/no/such/cert.pem", "/no/such/key.pem", None, "--internal-tls-cert /no/such/cert.pem"),
    ],
)
def test_bad_flags_name_the_flag(cert, key, ca, says) -> None:
    with pytest.raises(ValueError) as err:
        load(cert, key, ca)
    assert says in str(err.value)
