"""The HTTP JSON service (FastAPI on uvicorn).

    GET    /health                 status, loaded adapters, batching counters
    GET    /v1/adapters            known adapters (name, loaded, method)
    POST   /v1/adapters            {"name", "path"}: register and load an adapter folder (API key when set)
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
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import DeltatuneError
from ..layers import BASE
from .batcher import MicroBatcher
from .chat import ChatRequest, adapter_of, chat_chunk, chat_response, models_list, render
from .decoding import Sampling
from .engine import Engine
from .registry import ServeError

MAX_INPUTS = 64


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str] = Field(..., description="one text or a list of texts")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = 16
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False

    def sampling(self, index: int) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        seed = None if self.seed is None else self.seed + index
        top_p = 1.0 if self.top_p is None else self.top_p
        return Sampling(self.max_tokens, self.temperature or 0.0, top_p, seed, tuple(stop))


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


class Unauthorized(ServeError):
    status = 401


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _texts(value: str | list[str]) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ServeError("the input list is empty")
    if len(texts) > MAX_INPUTS:
        raise ServeError(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}")
    return texts


def create_app(
    engine: Engine, max_batch: int = 32, max_wait: float = 0.005, api_key: str | None = None, base_name: str = "base",
) -> FastAPI:
    """The FastAPI app serving ``engine``; ``api_key`` guards the adapter-loading endpoints when given;
    ``base_name`` is the base model's id in ``/v1/models`` and chat requests."""
    batcher = MicroBatcher(engine.run, max_batch=max_batch, max_wait=max_wait, max_adapters=engine.registry.max_loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    app.state.engine, app.state.batcher = engine, batcher

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

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        bearer = request.headers.get("authorization") or ""
        if bearer.lower().startswith("bearer "):
            given = given or bearer[7:].strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise Unauthorized("this endpoint needs the server's API key (header 'Authorization: Bearer KEY' or 'X-API-Key')")

    async def submit_all(kind: str, adapter: str, texts: list[str], body: CompletionRequest | None = None) -> list[Any]:
        items = [engine.check(kind, adapter, text, body.sampling(i) if body else None) for i, text in enumerate(texts)]
        return await asyncio.gather(*(batcher.submit(kind, adapter, item) for item in items))

    def stream_completions(
        body: CompletionRequest, adapter: str, texts: list[str], chunk: Any = None
    ) -> StreamingResponse:
        """Server-sent events: each row's text deltas as they are decoded (checks run before the response starts);
        ``chunk(id, created, model, index, delta, finish)`` shapes an event (default: a ``text_completion``)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(index: int):
            return lambda delta, finish: loop.call_soon_threadsafe(queue.put_nowait, (index, delta, finish, None))

        items = [engine.check("complete", adapter, t, body.sampling(i), sink(i)) for i, t in enumerate(texts)]
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        async def run(index: int, item: Any) -> None:
            try:
                await batcher.submit("complete", adapter, item)
            except Exception as error:  # the row failed: tell the client in the stream
                queue.put_nowait((index, None, "error", error))

        async def events():
            tasks = [asyncio.create_task(run(i, item)) for i, item in enumerate(items)]
            open_rows = set(range(len(items)))
            try:
                while open_rows:
                    index, delta, finish, error = await queue.get()
                    if error is not None:
                        message = {"message": str(error), "type": type(error).__name__, "index": index}
                        yield f"data: {json.dumps({'error': message})}\n\n"
                    elif chunk is not None:
                        yield f"data: {json.dumps(chunk(ident, created, body.model, index, delta, finish))}\n\n"
                    else:
                        choice = {"index": index, "text": delta, "finish_reason": finish, "logprobs": None}
                        event = {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                                 "choices": [choice]}
                        yield f"data: {json.dumps(event)}\n\n"
                    if finish is not None:
                        open_rows.discard(index)
                yield "data: [DONE]\n\n"
            finally:
                for task in tasks:
                    task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

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
        authorize(request)
        await batcher.call(lambda: engine.registry.add(body.name, body.path, load_now=True))
        return {"name": body.name, "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        await batcher.call(engine.registry.remove, name)
        return {"name": name, "deleted": True}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        adapter = body.model or BASE
        results = await submit_all("classify", adapter, _texts(body.input))
        return {"object": "classification", "model": body.model, "data": results}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        adapter = body.model or BASE
        if body.stream:
            return stream_completions(body, adapter, _texts(body.prompt))
        results = await submit_all("complete", adapter, _texts(body.prompt), body)
        choices = [
            {"index": i, "text": r["text"], "token_ids": r["tokens"], "finish_reason": r["finish_reason"], "logprobs": None}
            for i, r in enumerate(results)
        ]
        prompt_tokens = sum(r["prompt_tokens"] for r in results)
        completion_tokens = sum(len(r["tokens"]) for r in results)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    add_chat_routes(app, engine, base_name, submit_all, stream_completions)
    return app


def add_chat_routes(app: FastAPI, engine: Engine, base_name: str, submit_all: Any, stream_completions: Any) -> None:
    """``GET /v1/models`` and ``POST /v1/chat/completions``: a chat request runs as a completion (``chat.py``)."""

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return models_list(base_name, engine.registry.describe())

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        adapter = adapter_of(body.model, base_name)
        fields = body.completion_fields(engine.max_tokens)
        request = CompletionRequest(prompt=render(engine.counter, body.messages), **fields)
        if body.stream:
            return stream_completions(request, adapter, [request.prompt], chat_chunk)
        result = (await submit_all("complete", adapter, [request.prompt], request))[0]
        return chat_response(result, body.model)


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
