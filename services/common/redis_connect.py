"""One way to turn a `--redis-url` into a Redis client, for every command that takes one.

| URL | what |
|---|---|
| `redis://[[user]:password@]host:port[/db]` | one node (redis-py's own URL form, query options included) |
| `rediss://…` | one node over TLS; `?ssl_ca_certs=/ca.pem` trusts a private CA, `ssl_certfile`/`ssl_keyfile` present a client certificate |
| `redis+sentinel://[[user]:password@]host:port[,host:port…]/service_name[/db]` | the master Sentinel names `service_name`; the password is the master's, `?sentinel_password=` the sentinels' |
| `redis+cluster://[[user]:password@]host:port[,host:port…]` | a Redis Cluster, from any of its nodes (`rediss+cluster://` over TLS) |

Cluster URLs take the TLS query options above, Sentinel URLs `sentinel_password` (they are
plain: no TLS); nothing else, so a typo is an error rather than silently ignored. Every pool's keys share a hash tag (`pagedserve:{ID}:…`)
and no script spans two pools, so a Cluster spreads pools over its nodes.

Every `--redis-url` option also takes `env:NAME`: the URL in environment variable NAME. A command
line is readable by every user of the machine (`ps`), an environment only by the process's own;
`pagedserve up` hands a URL with a password to its services that way (`off_the_command_line`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel",)
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
FROM_ENV = "env:"  # `--redis-url env:NAME`: the URL in environment variable NAME
CHILD_URL_ENV = "PAGEDSERVE_REDIS_URL"  # where `pagedserve up` puts a URL with a password for its services


class RedisSetupError(RuntimeError):
    """A Redis URL that cannot work (bad form, refused password, bad certificate): a start-up error."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    kind: str  # "single", "sentinel" or "cluster"
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_options: dict[str, str] = field(default_factory=dict)
    sentinel_password: str | None = None


def redact(url: str) -> str:
    """`url` with its password replaced by `***` (for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def url_arg(value: str) -> str:
    """The argparse type of every `--redis-url` option: a URL as given, or for `env:NAME` the URL
    in environment variable NAME."""
    if not value.startswith(FROM_ENV):
        return value
    name = value.removeprefix(FROM_ENV)
    url = os.environ.get(name, "")
    if not url:
        raise argparse.ArgumentTypeError(f"{value}: environment variable {name!r} is not set or empty")
    return url


def off_the_command_line(url: str) -> tuple[str, dict[str, str]]:
    """What to pass a child as `--redis-url` for `url`, and what to add to its environment: a URL
    that carries a password (the master's or the sentinels') goes in CHILD_URL_ENV, out of sight
    of `ps`; any other stays on the command line, where it helps whoever reads `ps`."""
    if _password(url) is None and parse_qs(urlsplit(url).query).get("sentinel_password") is None:
        return url, {}
    return FROM_ENV + CHILD_URL_ENV, {CHILD_URL_ENV: url}


def _nodes(netloc_hosts: str, url: str) -> tuple[tuple[str, int], ...]:
    nodes = []
    for item in netloc_hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise RedisSetupError(f"--redis-url {redact(url)}: {item!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return tuple(nodes)


def parse_redis_url(url: str) -> RedisTarget:
    """What `url` names; `RedisSetupError` naming the part that is wrong."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in SINGLE_SCHEMES:
        return RedisTarget("single", url, tls=scheme == "rediss")
    if scheme not in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        known = ", ".join(f"{s}://" for s in SINGLE_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES)
        raise RedisSetupError(f"--redis-url {redact(url)}: the scheme must be one of {known}")
    # urlsplit cannot parse a comma-separated host list as a netloc, so split it by hand.
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) or None)
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    sentinel = scheme in SENTINEL_SCHEMES
    # Sentinel URLs are plain only (no TLS to the sentinels or the master).
    known = ("sentinel_password",) if sentinel else TLS_OPTIONS
    tls_options = {k: options.pop(k) for k in TLS_OPTIONS if k in options and not sentinel}
    sentinel_password = options.pop("sentinel_password", None) if sentinel else None
    if options:
        raise RedisSetupError(
            f"--redis-url {redact(url)}: unknown option(s) {', '.join(sorted(options))} (known: {', '.join(known)})"
        )
    nodes = _nodes(hosts, url)
    segments = [s for s in path.split("/") if s]
    if scheme in CLUSTER_SCHEMES:
        if tls_options and scheme != "rediss+cluster":
            raise RedisSetupError(f"--redis-url {redact(url)}: TLS options need rediss+cluster://")
        if segments not in ([], ["0"]):
            raise RedisSetupError(f"--redis-url {redact(url)}: a Redis Cluster has only database 0")
        return RedisTarget("cluster", url, nodes, "", 0, username, password, scheme == "rediss+cluster",
                           tls_options)  # fmt: skip
    if not segments or len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise RedisSetupError(
            f"--redis-url {redact(url)}: a Sentinel URL ends in /service_name or /service_name/db"
        )
    db = int(segments[1]) if len(segments) == 2 else 0
    return RedisTarget("sentinel", url, nodes, segments[0], db, username, password, False, tls_options,
                       sentinel_password)  # fmt: skip


def _given_timeouts(socket_timeout: float | None, socket_connect_timeout: float | None) -> dict:
    """The timeouts that were given (redis-py's own defaults for the others)."""
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
    return {k: v for k, v in timeouts.items() if v is not None}


def _common_kwargs(target: RedisTarget, decode_responses: bool, timeouts: dict) -> dict:
    kwargs = {"decode_responses": decode_responses, "username": target.username, "password": target.password}
    kwargs.update(timeouts)
    if target.tls:
        kwargs["ssl"] = True
        kwargs.update(target.tls_options)
        if "ssl_check_hostname" in kwargs:
            kwargs["ssl_check_hostname"] = kwargs["ssl_check_hostname"].lower() in ("1", "true", "yes")
    return kwargs


def connect(url: str, *, decode_responses: bool = False, socket_timeout: float | None = None,
            socket_connect_timeout: float | None = None):  # fmt: skip
    """A blocking client (`redis.Redis`, or `redis.cluster.RedisCluster` for a Cluster URL)."""
    import redis

    target = parse_redis_url(url)
    timeouts = _given_timeouts(socket_timeout, socket_connect_timeout)
    if target.kind == "single":
        return redis.Redis.from_url(url, decode_responses=decode_responses, **timeouts)
    kwargs = _common_kwargs(target, decode_responses, timeouts)
    if target.kind == "sentinel":
        from redis.sentinel import Sentinel

        sentinel_kwargs = {**timeouts, "password": target.sentinel_password}
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)
        return sentinel.master_for(target.service_name, db=target.db, **kwargs)
    from redis.cluster import ClusterNode, RedisCluster

    try:
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], **kwargs)
    except (
        Exception
    ) as err:  # the client reads the slot map at once: a refused password or certificate, or no node
        setup = _setup_error(err, url, strict=False)
        if setup is not None:
            raise setup from None
        raise redis.exceptions.ConnectionError(
            f"no Redis Cluster node of {redact(url)} answered: {err}"
        ) from err


def connect_async(url: str, *, decode_responses: bool = False, socket_timeout: float | None = None,
                  socket_connect_timeout: float | None = None):  # fmt: skip
    """An asyncio client (`redis.asyncio.Redis`, or `redis.asyncio.cluster.RedisCluster`)."""
    import redis.asyncio

    target = parse_redis_url(url)
    timeouts = _given_timeouts(socket_timeout, socket_connect_timeout)
    if target.kind == "single":
        return redis.asyncio.Redis.from_url(url, decode_responses=decode_responses, **timeouts)
    kwargs = _common_kwargs(target, decode_responses, timeouts)
    if target.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinel_kwargs = {**timeouts, "password": target.sentinel_password}
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)
        return sentinel.master_for(target.service_name, db=target.db, **kwargs)
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], **kwargs)


def _password(url: str) -> str | None:
    try:
        target = parse_redis_url(url)
    except RedisSetupError:
        return None
    return urlsplit(url).password if target.kind == "single" else target.password


# How a refused password reads when a client wraps the AuthenticationError (a cluster client does).
AUTH_MARKERS = (
    "WRONGPASS",
    "invalid username-password",
    "NOAUTH",
    "Authentication required",
    "HELLO must be called",
)


def _is_auth_error(err: BaseException) -> bool:
    import redis

    return isinstance(err, redis.exceptions.AuthenticationError) or any(m in str(err) for m in AUTH_MARKERS)


def explain(err: BaseException, url: str) -> str:
    """A start-up message for a Redis error: what failed, at which (redacted) URL, and what to check."""
    where = redact(url)
    text = str(err)
    if _is_auth_error(err):
        if "NOAUTH" in text or "Authentication required" in text or _password(url) is None:
            return f"Redis at {where} requires a password: put it in the URL (redis://:PASSWORD@host:port/0)"
        return f"Redis at {where} refused the credentials in the URL ({text})"
    if "certificate" in text.lower() or "ssl" in text.lower():
        return f"TLS to Redis at {where} failed ({text}); check ssl_ca_certs in the URL"
    return f"cannot reach Redis at {where}: {text}"


def _setup_error(err: BaseException, url: str, strict: bool) -> RedisSetupError | None:
    if _is_auth_error(err):
        return RedisSetupError(explain(err, url))
    text = str(err).lower()
    if strict or "certificate" in text or "ssl" in text:
        return RedisSetupError(explain(err, url))
    return None


def check(client, url: str, *, strict: bool = False) -> None:
    """PING through `client`; `RedisSetupError` with `explain`'s message when the credentials
    or certificates are wrong (an error of configuration, not of timing) or, when `strict`,
    on any failure. Otherwise other errors pass through, for a caller that waits for a Redis
    that is still starting."""
    import redis

    try:
        client.ping()
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as err:
        raise (_setup_error(err, url, strict) or err) from None


async def check_async(client, url: str, *, strict: bool = False) -> None:
    """`check` for an asyncio client."""
    import redis

    try:
        await client.ping()
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as err:
        raise (_setup_error(err, url, strict) or err) from None
