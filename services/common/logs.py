"""One log format for every service."""

from __future__ import annotations

import logging
import os


def setup_logging(service: str, level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("PAGEDSERVE_LOG_LEVEL", "INFO")).upper(),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
