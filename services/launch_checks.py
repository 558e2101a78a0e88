"""What `pagedserve up` asks before and while it starts the stack: is a port free, does a
Redis answer (and accept us), is a service ready."""

from __future__ import annotations

import socket

from pagedserve.common import internal_tls
from pagedserve.common.grpc_utils import health_check
from pagedserve.common.redis_connect import redact
from pagedserve.launch_plan import ServiceSpec


def redis_ping(address: str, timeout: float = 1.0) -> bool:
    """True when the Redis at host:port answers PING."""
    import redis

    host, port = address.rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port), socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def given_redis_problem(url: str, timeout: float = 5.0) -> str | None:
    """Why the Redis at `url` (given with --redis-url) cannot serve the stack, or None: a bad
    URL, a refused password, a bad certificate, or no answer at all, said before anything starts."""
    from pagedserve.common.redis_connect import RedisSetupError, check, connect

    client = None
    try:
        client = connect(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        check(client, url, strict=True)
    except RedisSetupError as err:
        return str(err)
    except Exception as err:  # a cluster client that found no node answering
        return f"cannot use --redis-url {redact(url)}: {err}"
    finally:
        if client is not None:
            client.close()
    return None


def is_ready(spec: ServiceSpec, timeout: float = 1.0) -> bool:
    """True when `spec`'s process answers its readiness probe."""
    if spec.probe == "redis":
        return redis_ping(spec.health_address, timeout)
    if spec.probe == "public":
        return health_check(spec.health_address, timeout=timeout, tls=internal_tls.InternalTLS())
    return health_check(spec.health_address, timeout=timeout)


def ports_in_use(host: str, ports: list[int]) -> list[int]:
    """The ports among `ports` that something already listens on at `host`.

    SO_REUSEADDR lets a port in TIME_WAIT pass; without SO_REUSEPORT a listener fails the
    bind. This matters: gRPC servers set SO_REUSEPORT, so a second one would share the port
    with a stale one instead of failing, and a health check could answer from the wrong process.
    """
    busy = []
    for port in ports:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError:
                busy.append(port)
    return busy
