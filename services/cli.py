"""The `pagedserve` command: one subcommand per service, plus the launcher and tools.

Each subcommand lives in its own module, imported only when chosen, which exposes
`add_arguments(parser)` and `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("pagedserve.launcher", "run Redis and every service as local processes"),
    "gateway": ("pagedserve.gateway.server", "run the gateway (public gRPC + OpenAI-compatible HTTP)"),
    "tokenizer": ("pagedserve.tokenizer.server", "run the tokenizer service"),
    "scheduler": ("pagedserve.scheduler.server", "run the scheduler service"),
    "executor": ("pagedserve.executor.server", "run the executor service"),
    "fsck": ("pagedserve.scheduler.fsck", "check the KV pools' block accounting in Redis (all, or --pool)"),
    "pools": ("pagedserve.scheduler.pools_cli", "list the executor pools registered in Redis and their load"),
    "bench": ("pagedserve.bench.cli", "drive a running stack with a load and report"),
    "demo": ("pagedserve.demo", "start the stack, send a few prompts, print answers and KV stats, stop"),
}


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="PagedAttention LLM serving.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(chosen)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    from pagedserve.common.redis_connect import RedisSetupError

    try:
        return int(module.main(args) or 0)
    except RedisSetupError as err:  # a --redis-url that cannot work: one line, no traceback
        print(f"pagedserve {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
