"""On/off switches read from the environment (`PAGEDSERVE_NATIVE_KERNELS=0` and the like)."""

from __future__ import annotations

import os

OFF = ("0", "false", "no", "off")


def switched_on(name: str) -> bool:
    """Whether the switch `name` is on: it is unless the variable says 0, false, no or off."""
    return os.environ.get(name, "1").strip().lower() not in OFF
