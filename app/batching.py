"""Uploads that arrive together share one forward pass.

The first waiting upload opens a window of `app.batch_window_ms`; every upload that arrives
before it closes (up to `score.batch_size`) joins the batch, and the batch is one call of the
work function on a single worker thread, so forward passes never compete for the cores. An
upload that waited through the previous batch's forward does not wait a second window.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class Batcher:
    """`await submit(item)` -> that item's result from `work(items) -> results` (same order)."""

    def __init__(self, work: Callable[[list[Any]], list[Any]], window_s: float, max_batch: int):
        self.work = work
        self.window_s = window_s
        self.max_batch = max(1, max_batch)
        self.batches = 0  # forward passes run (for /healthz and the tests)
        self.items = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cxr-forward")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((time.monotonic(), item, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            arrived, item, future = await self._queue.get()
            batch = [(item, future)]
            deadline = arrived + self.window_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    _, item, future = (self._queue.get_nowait() if remaining <= 0
                                       else await asyncio.wait_for(self._queue.get(), remaining))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                batch.append((item, future))
            items = [i for i, _ in batch]
            try:
                results = await loop.run_in_executor(self._pool, self.work, items)
            except Exception as exc:  # a fault of the batch: every waiting request learns it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(items)
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)
