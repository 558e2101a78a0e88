"""pagedserve: PagedAttention LLM serving as separate gRPC services."""

from __future__ import annotations

__version__ = "0.1.0"
