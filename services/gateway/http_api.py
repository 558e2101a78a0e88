"""The OpenAI-compatible HTTP API (FastAPI), served on the gateway's asyncio loop.

Errors before the first token (validation, unknown model, full queue, a service down) get
their HTTP status; an error after a stream has started arrives as a final `data: {"error":...}`
event. Every error body is JSON in OpenAI's shape. A client that disconnects has its request
aborted: streams are cancelled by Starlette, non-streaming requests by watching for
`http.disconnect`.

A JSON route reads its body only after the checks that cost nothing: Content-Type must be
application/json (415: a browser page cannot post JSON without a CORS preflight, which only
the origins given to `--allowed-origins` pass), a
Content-Length over `--max-request-bytes` is refused unread (413, and the connection closed),
and a body that stalls for `read_timeout` seconds is 408. The parsed JSON may nest at most
`max_json_depth` levels.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedserve import __version__
from pagedserve.common.errors import InvalidArgument, PagedServeError
from pagedserve.common.json_text import depth_over
from pagedserve.gateway.body_fields import check_object, header_request_id, read_request_id
from pagedserve.gateway.config import RequestLimits
from pagedserve.gateway.dashboard import add_dashboard_routes
from pagedserve.gateway.datatypes import (
    CompletedRequest,
    PayloadTooLarge,
    ReadTimeout,
    RequestOutput,
    Unauthenticated,
    UnsupportedMediaType,
    check_bearer,
)
from pagedserve.gateway.engine import Engine
from pagedserve.gateway.kv_map import KvMapReader, encode_body
from pagedserve.gateway.metrics import GatewayMetrics
from pagedserve.gateway.openai_request import ApiCall, parse_chat, parse_completion
from pagedserve.gateway.openai_response import ChunkFormatter, error_body, full_response
from pagedserve.gateway.sse import DONE, sse_event
from pagedserve.gateway.tokenize_api import detokenize, tokenize

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a full queue drains as requests finish; a second is a polite first wait


def error_response(err: PagedServeError) -> Response:
    """OpenAI's error JSON (ASCII-escaped, so no text a client sent can break the encoding)."""
    status, body = error_body(err)
    headers = {}
    if status == 429:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if status in (408, 413):
        headers["Connection"] = "close"  # the rest of the body is not read
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: asyncio.Future | asyncio.Task):
    """Await `work`, cancelling it (and raising `ClientGone`) if the client disconnects first."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            raise ClientGone()
        return work.result()
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()


class ApiKeyCheck:
    """ASGI middleware: /v1/*, /tokenize and /detokenize (and /metrics when protected) need
    `Authorization: Bearer <key>`.

    /health and /ready stay open for probes. The key is compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str, protect_metrics: bool) -> None:
        self.app = app
        self.api_key = api_key
        self.protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._protected(scope["path"]):
            try:
                check_bearer(dict(scope["headers"]).get(b"authorization"), self.api_key)
            except Unauthenticated as err:
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _protected(self, path: str) -> bool:
        return (
            path == "/v1"
            or path.startswith("/v1/")
            or path in ("/tokenize", "/detokenize")
            or (self.protect_metrics and path == "/metrics")
        )


async def read_json(request: Request, limits: RequestLimits) -> object:
    """The body as JSON, after the checks that cost nothing (see the module docstring)."""
    content_type = request.headers.get("content-type")
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {content_type!r}", field="Content-Type"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise PayloadTooLarge(
            f"the request body is {int(declared)} bytes, more than the limit of "
            f"{limits.max_request_bytes} (the gateway's --max-request-bytes)"
        )
    chunks, size = [], 0
    stream = request.stream()
    while True:
        try:
            async with asyncio.timeout(limits.read_timeout):
                chunk = await anext(stream, None)
        except TimeoutError:
            raise ReadTimeout(
                f"the request body stalled: nothing arrived for {limits.read_timeout:g}s after {size} bytes"
            ) from None
        if chunk is None:
            break
        size += len(chunk)
        if size > limits.max_request_bytes:
            raise PayloadTooLarge(
                f"the request body is more than the limit of {limits.max_request_bytes} bytes "
                "(the gateway's --max-request-bytes)"
            )
        chunks.append(chunk)
    data = b"".join(chunks)
    try:
        body = json.loads(data)
    except RecursionError:
        raise InvalidArgument(
            f"the request body nests arrays or objects more than {limits.max_json_depth} levels deep"
        ) from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise InvalidArgument(f"the request body is not valid JSON: {err}") from None
    opening = data.count(b"[") + data.count(b"{")
    if opening > limits.max_json_depth and depth_over(body, limits.max_json_depth):
        raise InvalidArgument(
            f"the request body nests arrays or objects more than {limits.max_json_depth} levels deep"
        )
    return body


def build_app(engine: Engine, metrics: GatewayMetrics) -> FastAPI:
    config = engine.config
    app = FastAPI(title="pagedserve", docs_url=None, redoc_url=None, openapi_url=None)
    if config.api_key:
        app.add_middleware(ApiKeyCheck, api_key=config.api_key, protect_metrics=config.protect_metrics)
    if config.allowed_origins:
        # Outermost, so a preflight (which carries no API key) is answered here. Only the listed
        # origins get the headers; a browser page elsewhere still cannot read or post.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],  # the openai JS SDK sends its x-stainless-* headers; no credentials
            expose_headers=["Retry-After"],
            max_age=600,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own answers (no such route, wrong method) in OpenAI's error shape."""
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return Response(json.dumps(body), status_code=exc.status_code, media_type="application/json")

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled error in an HTTP request")
        return error_response(PagedServeError(f"internal error: {type(exc).__name__}"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if engine.draining:
            return JSONResponse({"draining": True}, status_code=503)
        tokenizer_ok, scheduler_ok = await asyncio.gather(engine.tokenizer.ready(), engine.scheduler.ready())
        body = {"tokenizer": tokenizer_ok, "scheduler": scheduler_ok}
        return JSONResponse(body, status_code=200 if tokenizer_ok and scheduler_ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        try:
            stats = await engine.scheduler.stats(timeout=1.0)
            engine.note_stats(stats)
            metrics.update_from_stats(stats, up=True)
        except PagedServeError as err:
            log.info("metrics scrape without scheduler stats: %s", err.message)
            metrics.update_from_stats(None, up=False)
        return Response(metrics.render(engine.num_in_flight), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(m) for m in await engine.list_models()]}

    # `path`: served names may hold slashes (a hub id, or --model as a path: /v1/models//srv/m).
    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        card = next((m for m in await engine.list_models() if m.name == name), None)
        if card is None:
            return error_response(engine.unknown_model(name))
        return JSONResponse(_model_card(card))

    kv_map = KvMapReader(engine.scheduler)

    @app.get("/v1/kv/map")
    async def kv_map_view(request: Request, pool: str | None = None) -> Response:
        """Every block of every pool (`?pool=ID`: one), run-length encoded; see `kv_map.py`."""
        try:
            body = await kv_map.read(pool)
        except PagedServeError as err:
            return error_response(err)
        data, headers = await asyncio.to_thread(encode_body, body, request.headers.get("accept-encoding", ""))
        return Response(data, media_type="application/json", headers=headers)

    add_dashboard_routes(app)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(engine, request, parse_completion, "cmpl-")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(engine, request, parse_chat, "chatcmpl-")

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        return await _answer(engine, request, tokenize)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        return await _answer(engine, request, detokenize)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    return app


def _model_card(m) -> dict:
    return {
        "id": m.name,
        "object": "model",
        "created": 0,
        "owned_by": "pagedserve",
        "root": m.root,
        "parent": None,
        "max_model_len": m.max_model_len,
    }


async def _answer(
    engine: Engine, request: Request, handle: Callable[[Engine, dict], Awaitable[dict]]
) -> Response:
    """A JSON body in, `handle`'s dict out as JSON (or the error it raised)."""
    try:
        body = check_object(await read_json(request, engine.config.limits))
        return JSONResponse(await handle(engine, body))
    except PagedServeError as err:
        return error_response(err)
    except ClientDisconnect:
        return Response(status_code=499)


async def _serve(engine: Engine, request: Request, parse: Callable[..., ApiCall], id_prefix: str) -> Response:
    """A completions or chat call; the response's `X-Request-Id` is the client's id, or its own."""
    response = await _serve_call(engine, request, parse, id_prefix)
    request_id = getattr(request.state, "request_id", None) or header_request_id(request.headers)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id
    return response


async def _serve_call(
    engine: Engine, request: Request, parse: Callable[..., ApiCall], id_prefix: str
) -> Response:
    config = engine.config
    try:
        body = await read_json(request, config.limits)
        call = parse(body, config.limits, defaults=config.sampling_defaults)
        client_id = read_request_id(request.headers.get("x-request-id"), body)
        call.reasoning = call.reasoning_for(config.reasoning_parser)
    except PagedServeError as err:
        return error_response(err)
    except ClientDisconnect:
        log.info("client disconnected while sending its request")
        return Response(status_code=499)
    response_id = id_prefix + (client_id or uuid.uuid4().hex)
    request.state.request_id = client_id or response_id
    for i, generation in enumerate(call.requests):
        generation.request_id = response_id if len(call.requests) == 1 else f"{response_id}-{i}"
    created = int(time.time())
    model = engine.served_model_name
    outputs = engine.generate_batch(call.requests)
    try:
        if call.stream:
            first = await _unless_disconnected(request, asyncio.ensure_future(anext(outputs)))
            echo_texts = await _echo_texts(engine, call)
            formatter = ChunkFormatter(call, response_id, created, model, echo_texts)
            return StreamingResponse(
                _sse(engine, outputs, first, formatter),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await _unless_disconnected(
            request, asyncio.ensure_future(_collect(outputs, response_id, call))
        )
        echo_texts = await _echo_texts(engine, call)
        return JSONResponse(full_response(call, result, response_id, created, model, echo_texts))
    except PagedServeError as err:
        return error_response(err)
    except ClientGone:
        log.info("client of %s disconnected; request aborted", response_id)
        return Response(status_code=499)
    except StopAsyncIteration:
        return error_response(PagedServeError("the request ended without output"))
    finally:
        if not call.stream:
            engine.close_later(outputs)


async def _echo_texts(engine: Engine, call: ApiCall) -> list[str] | None:
    """Each prompt's text when the call asked for echo (its prompts are validated by now)."""
    if not call.echo:
        return None
    return list(await asyncio.gather(*(engine.prompt_text(r) for r in call.requests)))


async def _collect(outputs: AsyncIterator[RequestOutput], request_id: str, call: ApiCall) -> CompletedRequest:
    result = CompletedRequest.start(request_id, call.num_choices)
    async for output in outputs:
        result.add(output)
    return result


async def _sse(
    engine: Engine, outputs: AsyncIterator[RequestOutput], first: RequestOutput, formatter: ChunkFormatter
) -> AsyncIterator[bytes]:
    """The event stream; Starlette cancels it when the client goes, and closing it aborts the request."""
    try:
        formatter.count_prompt(first)  # the opening chunk's running usage has the prompt's tokens
        for chunk in formatter.start():
            yield sse_event(chunk)
        output: RequestOutput | None = first
        usage = None
        while output is not None:
            formatter.count(output)
            for chunk in formatter.deltas(output.choices, output.prompt_token_ids, output.prompt_logprobs):
                yield sse_event(chunk)
            usage = output.usage or usage
            output = await anext(outputs, None)
        if usage is not None:
            for chunk in formatter.usage(usage):
                yield sse_event(chunk)
        yield DONE
    except PagedServeError as err:
        yield sse_event(error_body(err)[1])
        yield DONE
    finally:
        engine.close_later(outputs)
