"""The gateway's configuration: one frozen dataclass, built from flags in `server.py`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Where the gateway listens, what it talks to, and its limits."""

    host: str = "0.0.0.0"
    grpc_port: int = 50051
    http_port: int = 8000
    tokenizer_address: str = "localhost:50052"
    scheduler_address: str = "localhost:50053"
    model: str = ""  # path or hub id of the served model; its name is `served_model_name`
    served_model_name: str = ""
    max_queued_requests: int = 1024  # requests in flight through this gateway; more get RESOURCE_EXHAUSTED
    request_timeout: float | None = None  # seconds a request may take end to end; None: no limit
    connect_timeout: float = 3.0  # seconds for a downstream unary call (Encode, Info, Stats, Abort)
    detokenize_timeout: float = 30.0  # seconds to wait for one Detokenize answer before giving up
    stall_probe_interval: float = (
        5.0  # seconds without a Submit message before checking the scheduler is alive
    )
    stall_timeout: float = 30.0  # seconds a request may go without progress while its scheduler is away
