"""`GET /dashboard`: the live KV map page, plain files served as they are (no build step).

The page and its script and style are public: they hold no data. The data comes from
`GET /v1/kv/map`, which sits behind `--api-key` like the rest of /v1; the page asks for the
key when the map answers 401 and keeps it in the browser's localStorage (or takes it once
from the address, `/dashboard#key=KEY`: a fragment never reaches the server or its logs).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

STATIC = Path(__file__).parent / "static"
FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "cells.js": ("cells.js", "text/javascript; charset=utf-8"),
    "chart.js": ("chart.js", "text/javascript; charset=utf-8"),
    "dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
# Only our own files run; the page talks to this gateway alone.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def add_dashboard_routes(app: FastAPI) -> None:
    def serve(name: str) -> Response:
        file_name, media_type = FILES[name]
        return Response((STATIC / file_name).read_bytes(), media_type=media_type, headers=HEADERS)

    @app.get("/dashboard")
    async def dashboard() -> Response:
        return serve("")

    @app.get("/dashboard/{name}")
    async def dashboard_file(name: str) -> Response:
        if not name or name not in FILES:
            return Response(
                '{"error": {"message": "no such dashboard file", "type": "not_found_error", '
                '"param": null, "code": "not_found"}}',
                status_code=404,
                media_type="application/json",
            )
        return serve(name)
