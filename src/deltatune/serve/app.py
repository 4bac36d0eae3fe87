"""The HTTP JSON service (FastAPI on uvicorn).

    GET    /health                 status, loaded adapters, batching counters
    GET    /v1/adapters            known adapters (name, loaded, method)
    POST   /v1/adapters            {"name", "path"}: register and load an adapter folder (API key when set);
                                   {"name", "combine": {"adapters", "weights", "type", "density", "rank"}}: a
                                   weighted combination of registered adapters (``add_weighted_adapter``)
    DELETE /v1/adapters/{name}     unload and forget an adapter (API key when set)
    POST   /v1/classify            {"model": adapter (base when omitted), "input": str | [str]}
    POST   /v1/completions         OpenAI-style {"model", "prompt": str | [str], "max_tokens", "temperature",
                                   "top_p", "seed", "stop", "stream"}; temperature 0 (default) = greedy; prompt k of
                                   a request samples with seed + k; "stream": true answers with server-sent events
                                   (one text delta per event, then "data: [DONE]")
    POST   /v1/chat/completions    OpenAI-style {"model", "messages", "max_tokens", ... "stream"}: the messages
                                   rendered with the chat template, then run as a completion (``chat.py``)
    GET    /v1/models              the base model (its --model name) and the registered adapters

Errors are JSON ``{"error": {"message", "type"}}`` with a 4xx status (400 bad input, 401 API key, 403 folder not
allowed, 404 unknown adapter, 409 name taken); an unexpected failure is a 500 and the server keeps serving.

``create_app`` registers the routes in groups (errors, adapters, completions, chat); the request bodies are in
``requests.py``; what the routes share (engine, micro-batcher, check thread, API key) is a ``service.Service``.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import DeltatuneError
from ..layers import BASE
from .chat import ChatRequest, adapter_of, chat_chunk, chat_response, models_list, render
from .engine import MAX_CHARS_PER_TOKEN, Engine
from .registry import ServeError
from .requests import UNSUPPORTED as UNSUPPORTED  # re-exported: clients and tests import it from here
from .requests import AdapterRequest, ClassifyRequest, CompletionRequest
from .service import MAX_INPUTS, Service, texts_of


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def create_app(
    engine: Engine, max_batch: int = 32, max_wait: float = 0.005, api_key: str | None = None,
    max_body: int | None = None, base_name: str = "base",
) -> FastAPI:
    """The FastAPI app serving ``engine``; ``api_key`` guards the adapter-loading endpoints when given; request
    bodies above ``max_body`` bytes (default: room for ``MAX_INPUTS`` inputs of ``max_length`` tokens) get a 413;
    ``base_name`` is the base model's id in ``/v1/models`` and chat requests."""
    service = Service(engine, max_batch, max_wait, api_key)
    max_body = max_body or max(2**20, MAX_INPUTS * engine.max_length * MAX_CHARS_PER_TOKEN)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body)
    app.state.engine, app.state.batcher = engine, service.batcher
    add_error_handlers(app)
    add_adapter_routes(app, service)
    add_completion_routes(app, service)
    add_chat_routes(app, service, base_name)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"error": {"message", "type"}}``: 400 for a malformed body, a ``DeltatuneError``'s
    ``status`` (default 400), 500 for anything unexpected."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in error.errors()[:5]
        )
        return _error(400, f"invalid request: {problems}", "invalid_request_error")

    @app.exception_handler(DeltatuneError)
    async def refused(request: Request, error: DeltatuneError) -> JSONResponse:
        status = getattr(error, "status", 400)
        return _error(status, str(error), type(error).__name__)

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(error).__name__}: {error}", "internal_error")


def add_adapter_routes(app: FastAPI, service: Service) -> None:
    """``GET /health``, ``GET|POST /v1/adapters``, ``DELETE /v1/adapters/{name}``."""
    engine, batcher = service.engine, service.batcher

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = batcher.stats
        return {
            "status": "ok", "task": engine.task, "loaded": list(engine.registry.loaded),
            "batches": stats.batches, "rows": stats.rows, "max_batch_rows": stats.max_rows,
            "max_batch_adapters": stats.max_adapters, "mixed_batches": stats.mixed_batches,
            "adapter_loads": engine.registry.loads, "adapter_evictions": engine.registry.evictions,
        }

    @app.get("/v1/adapters")
    async def list_adapters() -> dict[str, Any]:
        return {"object": "list", "data": engine.registry.describe()}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(body: AdapterRequest, request: Request) -> dict[str, Any]:
        service.authorize(request.headers)
        if (body.path is None) == (body.combine is None):
            raise ServeError("give either 'path' (an adapter folder) or 'combine' (a combination of adapters)")
        if body.path is not None:
            await batcher.call(lambda: engine.registry.add(body.name, body.path, load_now=True))
            return {"name": body.name, "loaded": True}
        c = body.combine
        weights = c.weights if c.weights is not None else [1.0] * len(c.adapters)
        result = await batcher.call(lambda: engine.registry.combine(
            body.name, c.adapters, weights, combination_type=c.type, svd_rank=c.rank, density=c.density,
            majority_sign_method=c.majority_sign_method, seed=c.seed))
        return {"name": body.name, "loaded": True, **result}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
        service.authorize(request.headers)
        await batcher.call(engine.registry.remove, name)
        return {"name": name, "deleted": True}


def add_completion_routes(app: FastAPI, service: Service) -> None:
    """``POST /v1/classify`` and ``POST /v1/completions``."""

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        adapter = body.model or BASE
        results = await service.submit_all("classify", adapter, texts_of(body.input))
        return {"object": "classification", "model": body.model, "data": results}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        adapter = body.model or BASE
        body.check_supported()
        if body.stream:
            return await service.stream_completions(body, adapter, texts_of(body.prompt))
        results = await service.submit_all("complete", adapter, texts_of(body.prompt), body)
        return completion_response(body.model, results)


def completion_response(model: str | None, results: list[dict[str, Any]]) -> dict[str, Any]:
    """A (non-streamed) ``text_completion``: one choice per prompt and the token usage."""
    choices = [
        {"index": i, "text": r["text"], "token_ids": r["tokens"], "finish_reason": r["finish_reason"], "logprobs": None}
        for i, r in enumerate(results)
    ]
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    completion_tokens = sum(len(r["tokens"]) for r in results)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": model, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def add_chat_routes(app: FastAPI, service: Service, base_name: str) -> None:
    """``GET /v1/models`` and ``POST /v1/chat/completions``: a chat request runs as a completion (``chat.py``)."""
    engine = service.engine

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return models_list(base_name, engine.registry.describe())

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        adapter = adapter_of(body.model, base_name)
        fields = body.completion_fields(engine.max_tokens)
        request = CompletionRequest(prompt=render(engine.counter, body.messages), **fields)
        if body.stream:
            return await service.stream_completions(request, adapter, [request.prompt], chat_chunk)
        result = (await service.submit_all("complete", adapter, [request.prompt], request))[0]
        return chat_response(result, body.model)


class BodyTooLarge(ServeError):
    status = 413


class BodyLimit:
    """ASGI middleware: a request whose body is over ``limit`` bytes is answered 413 without being parsed (by its
    Content-Length, or, for a chunked body, as soon as the bytes received pass the limit)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            await _error(413, f"request body is over {self.limit:,} bytes; send fewer or shorter inputs",
                         "request_too_large")(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(f"request body is over {self.limit:,} bytes; send fewer or shorter inputs")
            return message

        await self.app(scope, limited, send)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """uvicorn serving ``app`` on a thread (tests, benchmarks): ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
