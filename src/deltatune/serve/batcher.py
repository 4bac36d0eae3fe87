"""Micro-batching: concurrent requests are gathered into mixed-adapter batches for one worker thread.

A batch starts with the oldest waiting row and takes rows of the same kind until it holds ``max_batch`` rows or
``max_wait`` seconds have passed since its first row arrived; rows that would bring more than ``max_adapters``
distinct adapters into it wait for the next batch. Batches run one at a time on a single worker thread (the model
and the adapter registry are never used concurrently), while the event loop keeps accepting requests.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Pending:
    kind: str
    item: Any
    adapter: str
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Stats:
    batches: int = 0
    rows: int = 0
    max_rows: int = 0
    max_adapters: int = 0
    mixed_batches: int = 0  # batches with rows for more than one adapter

    def record(self, rows: list[Pending]) -> None:
        adapters = len({p.adapter for p in rows})
        self.batches += 1
        self.rows += len(rows)
        self.max_rows = max(self.max_rows, len(rows))
        self.max_adapters = max(self.max_adapters, adapters)
        self.mixed_batches += adapters > 1


class MicroBatcher:
    """``await submit(kind, adapter, item)`` -> the result of ``run(kind, items)`` for that item."""

    def __init__(
        self, run: Callable[[str, list[Any]], list[Any]], max_batch: int = 32, max_wait: float = 0.005,
        max_adapters: int = 8,
    ) -> None:
        self.run = run
        self.max_batch, self.max_wait, self.max_adapters = max(1, max_batch), max(0.0, max_wait), max(1, max_adapters)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltatune-batch")
        self.waiting: deque[Pending] = deque()
        self.stats = Stats()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for pending in self.waiting:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the server is shutting down"))
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, kind: str, adapter: str, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(Pending(kind, item, adapter, future))
        assert self._wake is not None, "MicroBatcher.start() was not called"
        self._wake.set()
        return await future

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` on the worker thread, between batches (e.g. loading an adapter)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def _take(self) -> list[Pending]:
        """The next batch: same kind as the oldest row, within the row and adapter limits, in arrival order."""
        kind = self.waiting[0].kind
        taken: list[Pending] = []
        adapters: set[str] = set()
        kept: deque[Pending] = deque()
        while self.waiting:
            pending = self.waiting.popleft()
            fits = pending.kind == kind and len(taken) < self.max_batch
            if fits and (pending.adapter in adapters or len(adapters) < self.max_adapters):
                taken.append(pending)
                adapters.add(pending.adapter)
            else:
                kept.append(pending)
        self.waiting = kept
        return taken

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            if not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = self.waiting[0].arrived + self.max_wait
            while len(self.waiting) < self.max_batch and (delay := deadline - time.monotonic()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    break
            batch = [p for p in self._take() if not p.future.done()]  # drop rows whose client went away
            if not batch:
                continue
            self.stats.record(batch)
            kind = batch[0].kind
            try:
                results = await self.call(self.run, kind, [p.item for p in batch])
            except Exception as error:  # the whole batch failed: every row gets the error, the loop goes on
                results = [error] * len(batch)
            for pending, result in zip(batch, results):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
