"""The OpenAI-compatible HTTP API (FastAPI), served on the gateway's asyncio loop.

Errors before the first token (validation, unknown model, full queue, a service down) get
their HTTP status; an error after a stream has started arrives as a final `data: {"error":...}`
event. A client that disconnects has its request aborted: streams are cancelled by Starlette,
non-streaming requests by watching for `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve.common.errors import InvalidArgument, PagedServeError
from pagedserve.gateway.datatypes import CompletedRequest, RequestOutput
from pagedserve.gateway.engine import Engine
from pagedserve.gateway.metrics import GatewayMetrics
from pagedserve.gateway.openai_request import ApiCall, parse_chat, parse_completion
from pagedserve.gateway.openai_response import ChunkFormatter, error_body, full_response
from pagedserve.gateway.sse import DONE, sse_event

log = logging.getLogger(__name__)


def error_response(err: PagedServeError) -> JSONResponse:
    status, body = error_body(err)
    return JSONResponse(body, status_code=status)


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


def build_app(engine: Engine, metrics: GatewayMetrics) -> FastAPI:
    app = FastAPI(title="pagedserve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {
            "error": {
                "message": str(exc.detail),
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        return JSONResponse(body, status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
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
        cards = await engine.list_models()
        return {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "pagedserve",
                    "max_model_len": m.max_model_len,
                }
                for m in cards
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(engine, request, parse_completion, "cmpl-")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(engine, request, parse_chat, "chatcmpl-")

    return app


async def _serve(
    engine: Engine, request: Request, parse: Callable[[dict], ApiCall], id_prefix: str
) -> Response:
    try:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InvalidArgument(f"the request body is not valid JSON: {err}") from None
        call = parse(body)
    except PagedServeError as err:
        return error_response(err)
    response_id = id_prefix + uuid.uuid4().hex
    call.request.request_id = response_id
    created = int(time.time())
    model = engine.served_model_name
    outputs = engine.generate(call.request)
    try:
        if call.stream:
            first = await _unless_disconnected(request, asyncio.ensure_future(anext(outputs)))
            formatter = ChunkFormatter(call, response_id, created, model)
            return StreamingResponse(
                _sse(engine, outputs, first, formatter),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await _unless_disconnected(
            request, asyncio.ensure_future(_collect(outputs, response_id, call))
        )
        return JSONResponse(full_response(call, result, response_id, created, model))
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


async def _collect(outputs: AsyncIterator[RequestOutput], request_id: str, call: ApiCall) -> CompletedRequest:
    result = CompletedRequest.start(request_id, call.request.sampling.n)
    async for output in outputs:
        result.add(output)
    return result


async def _sse(
    engine: Engine, outputs: AsyncIterator[RequestOutput], first: RequestOutput, formatter: ChunkFormatter
) -> AsyncIterator[bytes]:
    """The event stream; Starlette cancels it when the client goes, and closing it aborts the request."""
    try:
        for chunk in formatter.start():
            yield sse_event(chunk)
        output: RequestOutput | None = first
        usage = None
        while output is not None:
            for chunk in formatter.deltas(output.choices, output.prompt_token_ids):
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
