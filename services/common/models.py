"""Where models come from: the bundled one by default, any local path or hub id otherwise."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = REPO_ROOT / "models" / "tiny-py"


def default_model() -> str:
    """`$PAGEDSERVE_MODEL`, else the model bundled in the repository."""
    return os.environ.get("PAGEDSERVE_MODEL", str(BUNDLED_MODEL))


def served_model_name(model: str) -> str:
    """The name clients use: a local folder's name, or the hub id as given."""
    path = Path(model)
    return path.name if path.exists() else model
