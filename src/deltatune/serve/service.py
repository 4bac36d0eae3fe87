"""What the HTTP app's routes share: the engine, its micro-batcher, the request-check thread and the API key
(``Service``), and the helpers every route uses (authorising, checking texts off the event loop, submitting rows,
streaming a completion as server-sent events)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi.responses import StreamingResponse

from .batcher import MicroBatcher
from .engine import Engine
from .registry import ServeError
from .requests import CompletionRequest

MAX_INPUTS = 64


class Unauthorized(ServeError):
    status = 401


def texts_of(value: str | list[str]) -> list[str]:
    """A request's input(s) as a list: 400 when empty or longer than ``MAX_INPUTS``."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ServeError("the input list is empty")
    if len(texts) > MAX_INPUTS:
        raise ServeError(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}")
    return texts


class Service:
    """The state behind the routes. ``start``/``stop`` run in the app's lifespan: one thread tokenises request
    checks (off the event loop), the batcher's worker runs the model."""

    def __init__(self, engine: Engine, max_batch: int, max_wait: float, api_key: str | None) -> None:
        self.engine, self.api_key = engine, api_key
        self.batcher = MicroBatcher(engine.run, max_batch=max_batch, max_wait=max_wait,
                                    max_adapters=engine.registry.max_loaded)
        self.checker: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self.checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltatune-check")
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        checker, self.checker = self.checker, None
        checker.shutdown(wait=False)

    def authorize(self, headers: Any) -> None:
        """401 unless the request carries the API key (when the server has one)."""
        if self.api_key is None:
            return
        given = headers.get("x-api-key") or ""
        bearer = headers.get("authorization") or ""
        if bearer.lower().startswith("bearer "):
            given = given or bearer[7:].strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise Unauthorized("this endpoint needs the server's API key (header 'Authorization: Bearer KEY' or 'X-API-Key')")

    async def checked(self, kind: str, adapter: str, texts: list[str], body: CompletionRequest | None,
                      sinks: Any = None) -> list[Any]:
        """``engine.check`` every text on the checker thread: tokenising a long input must not stall the event loop
        (health checks, other clients)."""
        def check_all() -> list[Any]:
            return [self.engine.check(kind, adapter, t, body.sampling(i) if body else None, sinks(i) if sinks else None)
                    for i, t in enumerate(texts)]

        return await asyncio.get_running_loop().run_in_executor(self.checker, check_all)

    async def submit_all(self, kind: str, adapter: str, texts: list[str], body: CompletionRequest | None = None) -> list[Any]:
        items = await self.checked(kind, adapter, texts, body)
        return await asyncio.gather(*(self.batcher.submit(kind, adapter, item) for item in items))

    async def stream_completions(
        self, body: CompletionRequest, adapter: str, texts: list[str], chunk: Callable[..., Any] | None = None
    ) -> StreamingResponse:
        """Server-sent events: each row's text deltas as they are decoded (checks run before the response starts);
        ``chunk(id, created, model, index, delta, finish)`` shapes an event (default: a ``text_completion``)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(index: int):
            return lambda delta, finish: loop.call_soon_threadsafe(queue.put_nowait, (index, delta, finish, None))

        items = await self.checked("complete", adapter, texts, body, sink)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        shape = chunk or text_completion_chunk

        async def run(index: int, item: Any) -> None:
            try:
                await self.batcher.submit("complete", adapter, item)
            except Exception as error:  # the row failed: tell the client in the stream
                queue.put_nowait((index, None, "error", error))

        async def events() -> AsyncIterator[str]:
            tasks = [asyncio.create_task(run(i, item)) for i, item in enumerate(items)]
            open_rows = set(range(len(items)))
            try:
                while open_rows:
                    index, delta, finish, error = await queue.get()
                    if error is not None:
                        message = {"message": str(error), "type": type(error).__name__, "index": index}
                        yield f"data: {json.dumps({'error': message})}\n\n"
                    else:
                        yield f"data: {json.dumps(shape(ident, created, body.model, index, delta, finish))}\n\n"
                    if finish is not None:
                        open_rows.discard(index)
                yield "data: [DONE]\n\n"
            finally:
                for task in tasks:
                    task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def text_completion_chunk(ident: str, created: int, model: str | None, index: int, delta: str | None,
                          finish: str | None) -> dict[str, Any]:
    """One streamed ``/v1/completions`` event."""
    choice = {"index": index, "text": delta, "finish_reason": finish, "logprobs": None}
    return {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
