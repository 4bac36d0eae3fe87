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
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
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
from .engine import MAX_CHARS_PER_TOKEN, Engine
from .registry import ServeError

MAX_INPUTS = 64


# OpenAI completion fields the server accepts only at the value that means "not used", and why
UNSUPPORTED = {
    "n": (1, "one choice per prompt is returned; send the prompt several times in the prompt list instead"),
    "best_of": (None, "one choice per prompt is returned"),
    "echo": (False, "the prompt is not echoed back"),
    "logprobs": (None, "log-probabilities are not returned"),
    "suffix": (None, "insertion (text after the completion) is not supported"),
    "presence_penalty": (0, "repetition penalties are not implemented"),
    "frequency_penalty": (0, "repetition penalties are not implemented"),
    "logit_bias": (None, "logit biases are not implemented"),
}


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str] = Field(..., description="one text or a list of texts")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field the server does not know is named in a 400, never ignored
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = 16
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = None  # OpenAI's end-user id: bookkeeping only
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float = 0
    frequency_penalty: float = 0
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        """Answer 400 naming the first OpenAI field set to something this server does not implement."""
        for name, (inert, why) in UNSUPPORTED.items():
            value = getattr(self, name)
            if value != inert and not (name == "logit_bias" and value == {}) and not (name == "best_of" and value == 1):
                raise ServeError(f"'{name}': {value!r} is not supported by this server ({why}); omit the field")

    def sampling(self, index: int) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        seed = None if self.seed is None else self.seed + index
        top_p = 1.0 if self.top_p is None else self.top_p
        return Sampling(self.max_tokens, self.temperature or 0.0, top_p, seed, tuple(stop))


class CombineRequest(BaseModel):
    """``DeltaModel.add_weighted_adapter`` of registered adapters (see ``deltatune.combine``)."""

    model_config = ConfigDict(extra="forbid")
    adapters: list[str]
    weights: list[float] | None = None  # default: 1 each
    type: str = "svd"
    density: float | None = None
    rank: int | None = None
    majority_sign_method: str = "total"
    seed: int = 0


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str | None = None
    combine: CombineRequest | None = None


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
    engine: Engine, max_batch: int = 32, max_wait: float = 0.005, api_key: str | None = None,
    max_body: int | None = None, base_name: str = "base",
) -> FastAPI:
    """The FastAPI app serving ``engine``; ``api_key`` guards the adapter-loading endpoints when given; request
    bodies above ``max_body`` bytes (default: room for ``MAX_INPUTS`` inputs of ``max_length`` tokens) get a 413;
    ``base_name`` is the base model's id in ``/v1/models`` and chat requests."""
    batcher = MicroBatcher(engine.run, max_batch=max_batch, max_wait=max_wait, max_adapters=engine.registry.max_loaded)
    checker: dict[str, ThreadPoolExecutor] = {}  # one thread tokenises request checks, off the event loop
    max_body = max_body or max(2**20, MAX_INPUTS * engine.max_length * MAX_CHARS_PER_TOKEN)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        checker["pool"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltatune-check")
        await batcher.start()
        yield
        await batcher.stop()
        checker.pop("pool").shutdown(wait=False)

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body)
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

    async def checked(kind: str, adapter: str, texts: list[str], body: CompletionRequest | None, sinks: Any = None) -> list[Any]:
        """``engine.check`` every text on the checker thread: tokenising a long input must not stall the event loop
        (health checks, other clients)."""
        def check_all() -> list[Any]:
            return [engine.check(kind, adapter, t, body.sampling(i) if body else None, sinks(i) if sinks else None)
                    for i, t in enumerate(texts)]

        return await asyncio.get_running_loop().run_in_executor(checker["pool"], check_all)

    async def submit_all(kind: str, adapter: str, texts: list[str], body: CompletionRequest | None = None) -> list[Any]:
        items = await checked(kind, adapter, texts, body)
        return await asyncio.gather(*(batcher.submit(kind, adapter, item) for item in items))

    async def stream_completions(
        body: CompletionRequest, adapter: str, texts: list[str], chunk: Any = None
    ) -> StreamingResponse:
        """Server-sent events: each row's text deltas as they are decoded (checks run before the response starts);
        ``chunk(id, created, model, index, delta, finish)`` shapes an event (default: a ``text_completion``)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(index: int):
            return lambda delta, finish: loop.call_soon_threadsafe(queue.put_nowait, (index, delta, finish, None))

        items = await checked("complete", adapter, texts, body, sink)
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
        body.check_supported()
        if body.stream:
            return await stream_completions(body, adapter, _texts(body.prompt))
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
            return await stream_completions(request, adapter, [request.prompt], chat_chunk)
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
