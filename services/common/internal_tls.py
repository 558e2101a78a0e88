"""Mutual TLS between pagedserve's own services (gateway → tokenizer, gateway → scheduler,
scheduler → executor), and the health checks that reach them.

Every service takes the same flags, each with an environment variable:

| flag | env | meaning |
|---|---|---|
| `--internal-tls-cert` | `PAGEDSERVE_INTERNAL_TLS_CERT` | this service's certificate (PEM): served by its gRPC server, presented by its clients |
| `--internal-tls-key` | `PAGEDSERVE_INTERNAL_TLS_KEY` | its private key |
| `--internal-tls-ca` | `PAGEDSERVE_INTERNAL_TLS_CA` | the CA that signs the services' certificates: servers then require a client certificate it signed, clients check servers against it |
| `--internal-tls-server-name` | `PAGEDSERVE_INTERNAL_TLS_SERVER_NAME` | the name clients expect in servers' certificates, when it is not the host dialled (one certificate for every pod, say) |

One setting per process, made by the entry point (like logging) and read by every internal
server and client it builds; the gateway's public ports keep their own `--tls-cert`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import grpc

ENV_PREFIX = "PAGEDSERVE_INTERNAL_TLS_"


@dataclass(frozen=True, slots=True)
class InternalTLS:
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS with this certificate; with a CA, only clients holding a certificate it signed get in."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


_active = InternalTLS()


def configure(tls: InternalTLS) -> None:
    """Set this process's internal TLS (the entry point does, once, before building servers and clients)."""
    global _active
    _active = tls


def active() -> InternalTLS:
    return _active


def load(cert: str | None, key: str | None, ca: str | None, server_name: str | None = None) -> InternalTLS:
    """Read the files; `ValueError` naming the flag when one is missing, unreadable or unpaired."""
    if bool(cert) != bool(key):
        raise ValueError(
            "--internal-tls-cert and --internal-tls-key go together (one was given without the other)"
        )
    if ca and not cert:
        raise ValueError(
            "--internal-tls-ca needs --internal-tls-cert and --internal-tls-key too (mutual TLS)"
        )

    def read(flag: str, path: str | None) -> bytes | None:
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as err:
            raise ValueError(f"{flag} {path}: {err.strerror}") from None

    return InternalTLS(
        read("--internal-tls-cert", cert), read("--internal-tls-key", key), read("--internal-tls-ca", ca),
        server_name or None,
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mutual TLS between services (default: from PAGEDSERVE_INTERNAL_TLS_*)")
    for name, help_ in (
        ("cert", "this service's certificate (PEM), served and presented to the services it calls"),
        ("key", "the certificate's private key (PEM)"),
        ("ca", "CA of the services' certificates: servers require client certificates it signed"),
        ("server-name", "name expected in servers' certificates when it is not the host dialled"),
    ):
        env = ENV_PREFIX + name.upper().replace("-", "_")
        group.add_argument(f"--internal-tls-{name}", default=os.environ.get(env) or None, metavar="PATH"
                           if name != "server-name" else "NAME", help=f"{help_} (env {env})")  # fmt: skip


def configure_from_args(args: argparse.Namespace) -> InternalTLS:
    """`load` the flags `add_arguments` added and `configure` this process with them."""
    tls = load(
        args.internal_tls_cert, args.internal_tls_key, args.internal_tls_ca, args.internal_tls_server_name
    )
    configure(tls)
    return tls


def aio_channel(address: str, options: list, tls: InternalTLS | None = None) -> grpc.aio.Channel:
    """An asyncio channel to another pagedserve service, over TLS when this process has it."""
    tls = tls or _active
    if not tls.enabled:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=[*options, *tls.channel_options()]
    )


def channel(address: str, options: list | None = None, tls: InternalTLS | None = None) -> grpc.Channel:
    """A blocking channel to another pagedserve service (health checks)."""
    tls = tls or _active
    options = options or []
    if not tls.enabled:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=[*options, *tls.channel_options()])
