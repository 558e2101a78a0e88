"""The gateway's configuration: frozen dataclasses, built from flags in `server.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

# OpenAI's own limit on `n` ("Expected a value <= 128"), so clients written for OpenAI or
# vLLM never meet a lower one; each choice costs the gateway a detokenizer and a stop matcher.
DEFAULT_MAX_N = 128
# Beams per beam-search request: each step ranks width x 2 width candidates and each beam may
# hold its own blocks, so a wide search costs far more than as many plain choices.
DEFAULT_MAX_BEAM_WIDTH = 8
# Stop strings are matched against every choice's text at every step: cost ~ n x total length.
DEFAULT_MAX_STOP_STRINGS = 64
DEFAULT_MAX_STOP_CHARS = 4096
# 8 MiB holds a 1M-token prompt sent as JSON token ids (<= 8 bytes per id), yet bounds what
# one request can make the gateway hold.
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
# Deeper than any real body (a JSON schema in response_format is rarely past 10 levels).
DEFAULT_MAX_JSON_DEPTH = 64
DEFAULT_READ_TIMEOUT = 30.0

# The request-limit flags, the gateway's own and forwarded by `pagedserve up`: flag, type, default,
# bound (ints: at least; floats: above), why the bound, help.
REQUEST_LIMIT_FLAGS = (
    ("--max-n", int, DEFAULT_MAX_N, 1, "",
     f"most choices per request: n, times the prompts of a completions batch (default: {DEFAULT_MAX_N}, "
     "OpenAI's own limit)"),
    ("--max-beam-width", int, DEFAULT_MAX_BEAM_WIDTH, 1, "",
     f"most beams (n) of a use_beam_search request (default: {DEFAULT_MAX_BEAM_WIDTH})"),
    ("--max-stop-strings", int, DEFAULT_MAX_STOP_STRINGS, 1, "", "most stop strings per request"),
    ("--max-stop-chars", int, DEFAULT_MAX_STOP_CHARS, 1, "", "most characters over all of a request's stop strings"),
    ("--max-request-bytes", int, DEFAULT_MAX_REQUEST_BYTES, 1, "",
     "largest HTTP body; larger ones get 413 without being read (default: 8 MiB)"),
    ("--max-json-depth", int, DEFAULT_MAX_JSON_DEPTH, 2, " (a body is an object of lists)",
     "deepest nesting in a JSON body"),
    ("--read-timeout", float, DEFAULT_READ_TIMEOUT, 0.0, "",
     "seconds an HTTP client may take to send its headers, or pause while sending its body"),
)  # fmt: skip


def add_request_limits(parser, *, defaults: bool = True) -> None:
    """The request-limit flags as an argument group of `parser` (an argparse parser); without
    `defaults` each defaults to None (`pagedserve up`: not given, left to the gateway)."""
    group = parser.add_argument_group("request limits (the gateway's; checked before any work)")
    for flag, kind, default, _, _, text in REQUEST_LIMIT_FLAGS:
        group.add_argument(flag, type=kind, default=default if defaults else None, help=text)


def given_request_limits(args) -> tuple[tuple[str, float], ...]:
    """(flag, value) of each request-limit flag that parsed `args` (an argparse Namespace) holds
    a value for: every one for the gateway's parser, the given ones for `pagedserve up`'s."""
    values = ((flag, getattr(args, flag[2:].replace("-", "_"), None)) for flag, *_ in REQUEST_LIMIT_FLAGS)
    return tuple((flag, value) for flag, value in values if value is not None)


def check_request_limit(flag: str, value: float) -> None:
    """ValueError naming `flag` and its bound when `value` is outside it."""
    for name, kind, _, bound, why, _ in REQUEST_LIMIT_FLAGS:
        if name != flag:
            continue
        if kind is float and not value > bound:
            raise ValueError(f"{flag} must be > {bound:g}{why}")
        if kind is int and value < bound:
            raise ValueError(f"{flag} must be >= {bound}{why}")
        return
    raise KeyError(flag)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Sizes a request may ask for; every one is checked before anything is built for it."""

    max_n: int = DEFAULT_MAX_N  # choices per request (n, times the prompts of a batch)
    max_beam_width: int = DEFAULT_MAX_BEAM_WIDTH  # n with use_beam_search
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    max_stop_chars: int = DEFAULT_MAX_STOP_CHARS  # total characters over all stop strings
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # HTTP body; larger gets 413 unread
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH  # nesting of arrays and objects in a body
    read_timeout: float = DEFAULT_READ_TIMEOUT  # seconds an HTTP client may pause sending headers or body


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Where the gateway listens, what it talks to, and its limits."""

    host: str = "0.0.0.0"
    grpc_port: int = 50051
    http_port: int = 8000
    tokenizer_address: str = "localhost:50052"
    scheduler_address: str = "localhost:50053"  # one pool: its scheduler (and standbys, after commas)
    # More static pools, each like scheduler_address; with redis_url, pools come from the registry.
    more_pools: tuple[str, ...] = ()
    detokenize: str = "local"  # local (in this process) | remote (the tokenizer's Detokenize stream)
    redis_url: str | None = None  # discover pools (and route by their caches) through the registry
    # Without redis_url: the Redis the static pools' schedulers write, read by /v1/kv/map only.
    kv_map_redis_url: str | None = None
    routing: str = "cache_aware"  # cache_aware | least_loaded | round_robin
    routing_prefill_weight: float = 1.0  # cost of one uncached prompt token
    routing_decode_weight: float = 32.0  # cost of one request running or waiting in a pool
    # shared: all requests on one Connect stream per scheduler; per-request: a Submit call each
    scheduler_stream: str = "shared"
    migration_limit: int = 3  # times a request may move to another pool when its pool fails
    model: str = ""  # path or hub id of the served model, as given to --model
    # Names a request's `model` may use; the first is the one reported. Empty: `model` itself.
    served_model_names: tuple[str, ...] = ()
    max_queued_requests: int = 1024  # requests in flight through this gateway; more get RESOURCE_EXHAUSTED
    request_timeout: float | None = None  # seconds a request may take end to end; None: no limit
    connect_timeout: float = 3.0  # seconds for a downstream unary call (Encode, Info, Stats, Abort)
    detokenize_timeout: float = 30.0  # seconds to wait for one Detokenize answer before giving up
    stall_probe_interval: float = (
        5.0  # seconds without a Submit message before checking the scheduler is alive
    )
    stall_timeout: float = 30.0  # seconds a request may go without progress while its scheduler is away
    # Seconds requests in flight may run on after SIGTERM before they end with an error; less
    # than `pagedserve up`'s --stop-timeout (10 s), which then kills the gateway.
    shutdown_timeout: float = 5.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    # Sampling defaults from the model's generation_config.json (`--generation-config`): a request
    # that leaves one of these fields out gets the model's value (see `generation_defaults`).
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    tls_cert: str | None = None  # PEM certificate (chain) file: HTTPS and gRPC over TLS
    tls_key: str | None = None  # its PEM private key file
    api_key: str | None = None  # when set, HTTP /v1 and gRPC calls must carry it as a bearer token
    protect_metrics: bool = False  # with api_key: /metrics needs the key too
    allowed_origins: tuple[str, ...] = ()  # browser origins the HTTP API answers with CORS ("*": any)
    reasoning_parser: str | None = None  # chat: split <think>...</think> into `reasoning` (reasoning.py)

    @property
    def model_names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)

    @property
    def served_model_name(self) -> str:
        """The name reported in responses."""
        return self.model_names[0]
