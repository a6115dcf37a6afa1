"""Dynamic batching: concurrent requests for one version computed as one batch.

Requests queue on the event loop; one worker thread per version computes. While it computes,
new requests accumulate, and the next batch takes as many as fit in ``max_rows`` (so a busy
server batches by itself, and an idle one answers a lone request at once: on the event loop
itself when the model computes a lone request in under 5 ms). ``max_wait_ms`` > 0
also holds a batch open that long for more rows: worth it on a GPU, where a batch of 64 costs
little more than a batch of 1.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

Arrays = dict[str, np.ndarray]
INLINE_BELOW_S = 0.005
Compute = Callable[[Mapping[str, np.ndarray]], Arrays]


@dataclass
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[Arrays]
    key: tuple = field(default=())  # inputs must agree on everything but the row count


class Batcher:
    def __init__(
        self,
        compute: Compute,
        max_rows: int,
        max_wait_ms: float,
        name: str,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._compute = compute
        self._max_rows = max(1, max_rows)
        self._max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{name}")
        self._in_flight = 0
        # How long the last lone request took to compute: below INLINE_BELOW_S it runs on the
        # event loop itself, which a cheap model answers faster than through the compute thread.
        self._lone_compute_s = float("inf")

    @property
    def idle(self) -> bool:
        """No request waiting or being computed: safe to close."""
        return self._in_flight == 0

    async def submit(self, inputs: Mapping[str, np.ndarray]) -> Arrays:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run())
        first = next(iter(inputs.values()))
        key = tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(inputs.items()))
        pending = _Pending(inputs, int(first.shape[0]) if first.ndim else 1, loop.create_future(), key)
        self._queue.append(pending)
        assert self._wakeup is not None
        self._wakeup.set()
        self._in_flight += 1
        try:
            return await pending.future
        finally:
            self._in_flight -= 1

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._max_wait_s:
                await self._fill(time.monotonic() + self._max_wait_s)
            batch = self._take()
            if not batch:
                continue
            if self._on_batch is not None:
                self._on_batch(sum(p.rows for p in batch))
            alone = len(batch) == 1 and self._in_flight == 1
            try:
                merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
                began = time.perf_counter()
                if alone and self._lone_compute_s < INLINE_BELOW_S:
                    outputs = self._compute(merged)  # nothing else is waiting: skip the thread hop
                else:
                    outputs = await loop.run_in_executor(self._executor, self._compute, merged)
                if alone:
                    self._lone_compute_s = time.perf_counter() - began
            except Exception as exc:
                if len(batch) == 1:
                    if not batch[0].future.done():
                        batch[0].future.set_exception(exc)
                    continue
                # One request may have caused it (an input the model overflows on): each alone, so
                # only that one gets the error and the others their answers.
                for pending in batch:
                    await self._alone(loop, pending)
                continue
            start = 0
            for pending in batch:
                end = start + pending.rows
                if not pending.future.done():  # the client may have gone
                    pending.future.set_result({name: value[start:end] for name, value in outputs.items()})
                start = end

    async def _alone(self, loop: asyncio.AbstractEventLoop, pending: _Pending) -> None:
        try:
            outputs = await loop.run_in_executor(self._executor, self._compute, dict(pending.inputs))
        except Exception as exc:
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        if not pending.future.done():
            pending.future.set_result(outputs)

    async def _fill(self, deadline: float) -> None:
        assert self._wakeup is not None
        while sum(p.rows for p in self._queue) < self._max_rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        skipped: list[_Pending] = []
        while self._queue:
            pending = self._queue.popleft()
            if batch and (pending.key != batch[0].key or rows + pending.rows > self._max_rows):
                skipped.append(pending)
                if rows >= self._max_rows:
                    break
                continue
            batch.append(pending)
            rows += pending.rows
        self._queue.extendleft(reversed(skipped))
        return batch
