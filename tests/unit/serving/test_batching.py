from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batching import Batcher


class Recorder:
    """A compute function that records its batch sizes and doubles its input."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.fail = fail
        self.threads: set[str] = set()

    def __call__(self, inputs):
        self.last_thread = threading.current_thread().name
        self.threads.add(self.last_thread)
        self.batches.append(len(inputs["x"]))
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("model exploded")
        return {"y": inputs["x"] * 2}


def rows(value: float, n: int = 1, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.full((n, width), value, dtype=np.float32)}


async def gather(batcher: Batcher, requests):
    return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows():
    compute = Recorder(delay_s=0.01)

    async def main():
        batcher = Batcher(compute, max_rows=64, max_wait_ms=0, name="t")
        results = await gather(batcher, [rows(i, n=1 + i % 3) for i in range(40)])
        batcher.close()
        return results

    results = asyncio.run(main())
    for i, result in enumerate(results):
        assert result["y"].shape == (1 + i % 3, 3)
        assert np.all(result["y"] == 2 * i)
    assert sum(compute.batches) == sum(1 + i % 3 for i in range(40))
    assert max(compute.batches) > 3  # requests really were merged
    assert compute.threads and all(name.startswith("compute-t") for name in compute.threads)


def test_a_batch_never_exceeds_max_rows():
    compute = Recorder(delay_s=0.005)

    async def main():
        batcher = Batcher(compute, max_rows=8, max_wait_ms=0, name="t")
        await gather(batcher, [rows(1, n=3) for _ in range(30)])
        batcher.close()

    asyncio.run(main())
    assert max(compute.batches) <= 8


def test_max_wait_holds_a_batch_open_for_late_requests():
    compute = Recorder()

    async def main():
        batcher = Batcher(compute, max_rows=64, max_wait_ms=50, name="t")
        first = asyncio.create_task(batcher.submit(rows(1)))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(batcher.submit(rows(2)))
        await asyncio.gather(first, second)
        batcher.close()

    asyncio.run(main())
    assert compute.batches == [2]


def test_a_batch_that_fails_on_one_request_fails_only_that_one():
    """A request whose input the model cannot compute must not take the others in its batch down."""

    def compute(inputs):
        time.sleep(0.01)  # long enough for the others to queue behind the first
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return {"y": inputs["x"] * 2}

    async def main():
        batcher = Batcher(compute, max_rows=64, max_wait_ms=0, name="t")
        answers = await gather(batcher, [rows(1), rows(2), rows(-3), rows(4), rows(5, n=2)])
        batcher.close()
        return answers

    first, second, bad, fourth, fifth = asyncio.run(main())
    assert isinstance(bad, ValueError)
    assert [float(a["y"][0, 0]) for a in (first, second, fourth, fifth)] == [2, 4, 8, 10]
    assert fifth["y"].shape == (2, 3)


def test_a_failing_batch_fails_every_request_in_it_and_the_batcher_goes_on():
    compute = Recorder(fail=True)

    async def main():
        batcher = Batcher(compute, max_rows=64, max_wait_ms=0, name="t")
        failed = await gather(batcher, [rows(i) for i in range(5)])
        compute.fail = False
        ok = await batcher.submit(rows(7))
        batcher.close()
        return failed, ok

    failed, ok = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in failed)
    assert np.all(ok["y"] == 14)


def test_requests_with_different_row_shapes_are_not_merged():
    compute = Recorder(delay_s=0.01)

    async def main():
        batcher = Batcher(compute, max_rows=64, max_wait_ms=0, name="t")
        results = await gather(
            batcher, [rows(1, width=3), rows(2, width=5), rows(3, width=3), rows(4, width=5)]
        )
        batcher.close()
        return results

    results = asyncio.run(main())
    assert [r["y"].shape[1] for r in results] == [3, 5, 3, 5]


@pytest.mark.parametrize("max_wait_ms", [0, 5])
def test_a_lone_request_is_answered(max_wait_ms):
    compute = Recorder()

    async def main():
        batcher = Batcher(compute, max_rows=64, max_wait_ms=max_wait_ms, name="t")
        result = await asyncio.wait_for(batcher.submit(rows(3)), timeout=2)
        assert batcher.idle
        batcher.close()
        return result

    assert np.all(asyncio.run(main())["y"] == 6)


def threads_of_lone_requests(compute: Recorder, count: int = 3) -> list[str]:
    """The thread each of ``count`` requests, sent one after the other, was computed on."""

    async def main():
        batcher = Batcher(compute, max_rows=64, max_wait_ms=0, name="t")
        names = []
        for i in range(count):
            await batcher.submit(rows(i))
            names.append(compute.last_thread)
        batcher.close()
        return names

    return asyncio.run(main())


def test_a_lone_cheap_request_skips_the_compute_thread_once_it_is_known_to_be_cheap():
    names = threads_of_lone_requests(Recorder())
    assert names[0].startswith("compute-t")  # first: measured on the compute thread
    assert names[1:] == ["MainThread", "MainThread"]


def test_a_lone_slow_request_stays_on_the_compute_thread():
    names = threads_of_lone_requests(Recorder(delay_s=0.006))
    assert all(name.startswith("compute-t") for name in names)
