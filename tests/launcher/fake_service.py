"""A stand-in service for the launcher's tests: a real process with a real gRPC health
service, which can also fail at start-up, never become ready, ignore SIGTERM, die later,
or start a grandchild that ignores SIGTERM.

    python fake_service.py --port P --mode serve|fail|hang|stubborn [--exit-after S] [--grandchild]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time

from pagedserve.common.grpc_utils import GrpcServer, run_until_signal

IGNORE_TERM_AND_SLEEP = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


async def serve(args: argparse.Namespace) -> int:
    server = GrpcServer("127.0.0.1", args.port)
    await server.start()
    if args.grandchild:
        # Same process group as this one, and deaf to SIGTERM: only a SIGKILL to the group ends it.
        grandchild = subprocess.Popen([sys.executable, "-c", IGNORE_TERM_AND_SLEEP])
        print(f"grandchild pid {grandchild.pid}", flush=True)
    print(f"fake serving on {args.port}", flush=True)
    if args.exit_after is not None:
        await asyncio.sleep(args.exit_after)
        print(f"fake giving up after {args.exit_after}s", file=sys.stderr, flush=True)
        return 5
    if args.mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        await asyncio.Event().wait()
    await run_until_signal(server.stop)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["serve", "fail", "hang", "stubborn"], default="serve")
    parser.add_argument("--exit-after", type=float, default=None)
    parser.add_argument("--grandchild", action="store_true")
    args = parser.parse_args()
    if args.mode == "fail":
        print("fake: loading model /no/such/model", flush=True)
        print("OSError: fake: no model at /no/such/model", file=sys.stderr, flush=True)
        return 3
    if args.mode == "hang":
        time.sleep(600)
        return 0
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
