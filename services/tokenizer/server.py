"""`pagedserve tokenizer`: load the tokenizer, serve it over gRPC until SIGINT or SIGTERM.

Flags override the environment, which overrides the defaults:
`--model` ($PAGEDSERVE_MODEL, else the bundled model), `--host` ($PAGEDSERVE_TOKENIZER_HOST),
`--port` ($PAGEDSERVE_TOKENIZER_PORT), `--max-input-bytes` ($PAGEDSERVE_TOKENIZER_MAX_INPUT_BYTES),
`--chat-template` (a Jinja file or text in place of the model's template; checked at start).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from pagedserve.common import event_loop, internal_tls
from pagedserve.common.grpc_utils import GrpcServer, run_until_signal
from pagedserve.common.logs import setup_logging
from pagedserve.common.models import default_model
from pagedserve.tokenizer.core import DEFAULT_MAX_INPUT_BYTES, ServedTokenizer
from pagedserve.tokenizer.servicer import SERVICE_NAME, TokenizerServicer
from pagedserve.v1 import tokenizer_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 50052


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    """Everything the tokenizer service is started with; `port` 0 picks a free port."""

    model: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    chat_template: str = ""  # a file or the Jinja text; "": the model's own

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TokenizerConfig:
        return cls(
            model=args.model,
            host=args.host,
            port=args.port,
            max_input_bytes=args.max_input_bytes,
            chat_template=args.chat_template,
        )


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"${name} must be an integer, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=default_model(), help="tokenizer folder or hub id (default: %(default)s)"
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("PAGEDSERVE_TOKENIZER_HOST", DEFAULT_HOST),
        help="interface to bind (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=_env_int("PAGEDSERVE_TOKENIZER_PORT", DEFAULT_PORT),
        help="gRPC port, 0 for any free one (default: %(default)s)",
    )
    parser.add_argument(
        "--max-input-bytes",
        type=int,
        default=_env_int("PAGEDSERVE_TOKENIZER_MAX_INPUT_BYTES", DEFAULT_MAX_INPUT_BYTES),
        help="largest text Encode accepts, in UTF-8 bytes (default: %(default)s)",
    )
    parser.add_argument(
        "--chat-template",
        default="",
        help="a Jinja chat template, as a file or the text itself, in place of the model's own "
        "(default: the model's)",
    )
    internal_tls.add_arguments(parser)


async def start_server(tokenizer: ServedTokenizer, config: TokenizerConfig) -> GrpcServer:
    """Start serving `tokenizer`; the bound port is `server.bound_port`."""
    server = GrpcServer(config.host, config.port, tls=internal_tls.active())
    server.add(tokenizer_pb2_grpc.add_TokenizerServicer_to_server, TokenizerServicer(tokenizer), SERVICE_NAME)
    await server.start()
    return server


async def serve(tokenizer: ServedTokenizer, config: TokenizerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop (health NOT_SERVING first, then a short grace)."""
    server = await start_server(tokenizer, config)
    log.info(
        "tokenizer for %s (vocab %d, chat template: %s) listening on %s:%d",
        config.model,
        tokenizer.vocab_size,
        "yes" if tokenizer.has_chat_template else "no",
        config.host,
        server.bound_port,
    )
    await run_until_signal(server.stop)
    log.info("tokenizer stopped")


def main(args: argparse.Namespace) -> int:
    setup_logging("tokenizer")
    try:
        internal_tls.configure_from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    config = TokenizerConfig.from_args(args)
    if config.max_input_bytes < 1:
        log.error("--max-input-bytes must be >= 1, got %d", config.max_input_bytes)
        return 2
    try:
        tokenizer = ServedTokenizer.load(
            config.model, max_input_bytes=config.max_input_bytes, chat_template=config.chat_template
        )
    except (OSError, ValueError) as exc:  # no such folder, no tokenizer files, a malformed hub id
        log.error("could not load the tokenizer of %s: %s", config.model, exc)
        return 1
    try:
        event_loop.run(serve(tokenizer, config))
    except OSError as exc:  # the port is taken
        log.error("tokenizer failed: %s", exc)
        return 1
    return 0
