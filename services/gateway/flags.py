"""`pagedserve gateway`'s flags, and the `GatewayConfig` they make (a bad value exits with its flag named)."""

from __future__ import annotations

import argparse
import os
import re

from pagedserve.common import internal_tls
from pagedserve.common.models import default_model
from pagedserve.common.redis_connect import url_arg
from pagedserve.gateway import generation_defaults
from pagedserve.gateway.config import (
    GatewayConfig,
    RequestLimits,
    add_request_limits,
    check_request_limit,
    given_request_limits,
)
from pagedserve.gateway.reasoning import PARSERS
from pagedserve.gateway.scheduler_stream import SCHEDULER_STREAMS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (gRPC and HTTP)")
    parser.add_argument("--grpc-port", type=int, default=50051, help="public gRPC port")
    parser.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP port")
    parser.add_argument("--tokenizer", default="localhost:50052", help="tokenizer service address")
    parser.add_argument(
        "--scheduler",
        action="append",
        default=None,
        help="a pool's scheduler address (its standbys after commas: a:50053,b:50053); repeat the "
        "flag for more pools (default: localhost:50053 unless --redis-url finds the pools)",
    )
    parser.add_argument(
        "--detokenize",
        choices=["local", "remote"],
        default="local",
        help="local: the gateway loads the tokenizer and turns tokens into text itself (no round trip "
        "per step); remote: over the tokenizer service's Detokenize stream",
    )
    parser.add_argument(
        "--redis-url",
        type=url_arg,
        default=None,
        help="discover every pool in the registry in this Redis and route by what their caches hold",
    )
    parser.add_argument(
        "--kv-map-redis-url",
        type=url_arg,
        default=None,
        help="with static --scheduler pools: the Redis their schedulers write, which GET /v1/kv/map "
        "and /dashboard read the blocks from (with --redis-url that Redis is used)",
    )
    parser.add_argument(
        "--routing",
        choices=["cache_aware", "least_loaded", "round_robin"],
        default="cache_aware",
        help="how a pool is chosen: cache_aware minimizes prefill_weight x uncached prompt tokens + "
        "decode_weight x (running + waiting requests); least_loaded; round_robin",
    )
    parser.add_argument(
        "--routing-prefill-weight", type=float, default=1.0, help="cost of one uncached prompt token"
    )
    parser.add_argument(
        "--routing-decode-weight",
        type=float,
        default=32.0,
        help="cost of one request running or waiting in a pool",
    )
    parser.add_argument(
        "--migration-limit",
        type=int,
        default=3,
        help="times a request may move to another pool when its pool fails mid-stream",
    )
    parser.add_argument(
        "--scheduler-stream",
        choices=SCHEDULER_STREAMS,
        default="shared",
        help="shared: one Connect stream per scheduler carries all requests, one message per step; "
        "per-request: a Submit stream per request (for comparison)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="seconds a request may make no progress while its scheduler is away (re-attaching "
        "meanwhile) before it fails with UNAVAILABLE / an error event",
    )
    parser.add_argument(
        "--model", default=None, help="served model path or hub id (default: the bundled model)"
    )
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="names clients may use in `model`; the first is reported in responses "
        "(default: --model exactly as given, as vLLM does)",
    )
    parser.add_argument(
        "--generation-config",
        default="auto",
        metavar="auto|vllm|FOLDER",
        help="default sampling parameters (temperature, top_p, top_k, min_p, repetition_penalty) for "
        "requests that leave them out: auto, from the model folder's generation_config.json; vllm, "
        "the API's own defaults; or that file in FOLDER (default: auto)",
    )
    parser.add_argument(
        "--reasoning-parser",
        choices=PARSERS,
        default=None,
        help="split a reasoning model's <think>...</think> from its answer into the chat message's "
        "`reasoning` field (deepseek_r1: thinking until </think>; qwen3: only when the output opens "
        "with <think>; default: off)",
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="requests in flight through this gateway before new ones get RESOURCE_EXHAUSTED / 429",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds a request may take end to end (default: none)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        help="on SIGTERM, seconds requests in flight may take to finish before they end with an "
        "error (new ones get 503 / UNAVAILABLE meanwhile)",
    )
    add_request_limits(parser)
    parser.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on HTTP /v1 and the same gRPC metadata "
        "(default: $PAGEDSERVE_API_KEY; none: open)",
    )
    parser.add_argument(
        "--protect-metrics", action="store_true", help="with an API key, /metrics needs it too"
    )
    parser.add_argument(
        "--allowed-origins",
        nargs="+",
        default=None,
        metavar="ORIGIN",
        help="browser origins (https://ui.example.com, or * for any) whose pages may call the HTTP "
        "API: CORS headers and preflight answers for them (default: none, same-origin only)",
    )
    parser.add_argument(
        "--tls-cert", default=None, help="PEM certificate file: serve HTTPS and gRPC over TLS"
    )
    parser.add_argument("--tls-key", default=None, help="PEM private key file of --tls-cert")
    internal_tls.add_arguments(parser)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    model = args.model or default_model()
    if args.max_queued_requests < 1:
        raise SystemExit("--max-queued-requests must be >= 1")
    for flag, value in given_request_limits(args):
        try:
            check_request_limit(flag, value)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if args.shutdown_timeout < 0:
        raise SystemExit("--shutdown-timeout must be >= 0")
    names = tuple(dict.fromkeys(args.served_model_name or [model]))
    if any(not name.strip() for name in names):
        raise SystemExit("--served-model-name: names must not be empty")
    try:
        sampling_defaults = generation_defaults.load(args.generation_config, model)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for origin in args.allowed_origins or ():
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise SystemExit(
                f"--allowed-origins: {origin!r} is not * or an origin like https://ui.example.com"
            )
    api_key = args.api_key or os.environ.get("PAGEDSERVE_API_KEY") or None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key):
        if path and not os.path.isfile(path):
            raise SystemExit(f"TLS file not found: {path}")
    return GatewayConfig(
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        tokenizer_address=args.tokenizer,
        scheduler_address=(args.scheduler or ["" if args.redis_url else "localhost:50053"])[0],
        more_pools=tuple((args.scheduler or [])[1:]),
        redis_url=args.redis_url,
        kv_map_redis_url=args.kv_map_redis_url,
        detokenize=args.detokenize,
        routing=args.routing,
        routing_prefill_weight=args.routing_prefill_weight,
        routing_decode_weight=args.routing_decode_weight,
        migration_limit=args.migration_limit,
        scheduler_stream=args.scheduler_stream,
        stall_timeout=args.stall_timeout,
        model=model,
        served_model_names=names,
        max_queued_requests=args.max_queued_requests,
        request_timeout=args.request_timeout if args.request_timeout and args.request_timeout > 0 else None,
        shutdown_timeout=args.shutdown_timeout,
        sampling_defaults=sampling_defaults,
        limits=RequestLimits(
            max_n=args.max_n,
            max_beam_width=args.max_beam_width,
            max_stop_strings=args.max_stop_strings,
            max_stop_chars=args.max_stop_chars,
            max_request_bytes=args.max_request_bytes,
            max_json_depth=args.max_json_depth,
            read_timeout=args.read_timeout,
        ),
        api_key=api_key,
        protect_metrics=args.protect_metrics,
        allowed_origins=tuple(args.allowed_origins or ()),
        reasoning_parser=args.reasoning_parser,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
