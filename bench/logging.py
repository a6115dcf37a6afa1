"""Inference log benchmark: how fast each store takes events, and reads a window back.

One run, the same events (shaped like the demo model's: three raw features, a label and two
scores), for each store:

- ``sqlite``: the embedded store, alone, and while another *process* scans the same window over
  and over (the model server writing while an Airflow task reads), written three ways: single
  events (``write``), batches of logged requests as the model server's log writer stores them
  (``write_requests``: one record per batch, its lines as they came, expanded to rows when read),
  and the same requests a batch each (what a writer without hand-overs would store);
- ``opensearch``: osmem-server (in-memory OpenSearch API) through opensearch-py;
- ``elasticsearch``: the same server through the official client and the header proxy of the tests.

Writes go in batches of 500 (the logger's default). Figures are events per second and ratios to
the embedded store writing alone, measured in the same run. The target for the embedded store is
20,000 events/s written while a reader scans. The search server here is an in-memory test double:
its figures say what the client code costs, not what an Elasticsearch cluster does.

    .venv/bin/python -m bench.logging [--events 100000]

The cost of logging on serving throughput is measured by bench/serving.py (ours vs ours-nolog).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from monitoring.events import InferenceEvent, RequestBatch, encode_request
from monitoring.logstore import get_log_store

BATCH = 500
T0 = 1_790_000_000_000


def events(count: int, offset: int = 0) -> list[InferenceEvent]:
    return [
        InferenceEvent(
            event_id=f"bench{offset + i:x}-0",
            ts_ms=T0 + offset + i,
            model="fraud",
            version="2",
            role="stable",
            request_id=uuid.uuid4().hex,
            row=0,
            inputs={
                "amount": 10.0 + i % 97,
                "age_days": float(i % 1500),
                "country": ("DE", "FR", "US")[i % 3],
            },
            outputs={"label": "legit", "probabilities": [0.93, 0.07]},
            latency_ms=0.31,
        )  # fmt: skip
        for i in range(count)
    ]


def lines(count: int, offset: int) -> list[bytes]:
    """The same rows as ``events``, one request each, as the model server logs them (the V1 body as
    the client sent it, and the outputs)."""
    return [
        encode_request(
            e.ts_ms / 1000,
            e.latency_ms / 1000,
            e.model,
            e.version,
            e.role,
            e.request_id,
            "v1",
            orjson.dumps({"instances": [e.inputs]}),
            None,
            {name: [value] for name, value in e.outputs.items()},
        )
        + b"\n"  # fmt: skip
        for e in events(count, offset)
    ]


def batch(count: int, offset: int) -> list[RequestBatch]:
    """The requests as one batch, as the log writer reads a hand-over from the model server."""
    found = RequestBatch.scan("bench", offset, b"".join(lines(count, offset)))
    assert found is not None
    return [found]


def singles(count: int, offset: int) -> list[RequestBatch]:
    """The same requests, a batch each."""
    made = [RequestBatch.scan("bench", offset + i, line) for i, line in enumerate(lines(count, offset))]
    assert all(made)
    return made  # type: ignore[return-value]


WAYS: dict[str, Callable[[int, int], Any]] = {"": events, " batches": batch, " request-batches": singles}


def write_rate(url: str, count: int, way: str = "", **options: object) -> float:
    store = get_log_store(url, **options)
    write = store.write if way == "" else store.write_requests
    batches = [WAYS[way](BATCH, offset) for offset in range(0, count, BATCH)]
    began = time.perf_counter()
    for items in batches:
        write(items)
    elapsed = time.perf_counter() - began
    store.refresh()
    return count / elapsed


def read_rate(url: str, count: int, **options: object) -> float:
    store = get_log_store(url, **options)
    began = time.perf_counter()
    read = sum(1 for _ in store.query("fraud", T0, T0 + count))
    elapsed = time.perf_counter() - began
    assert read == count, (read, count)
    return count / elapsed


def _scan_forever(url: str, stop: Any, scans: Any) -> None:
    store = get_log_store(url)
    while not stop.is_set():
        for _ in store.query("fraud", T0, T0 + 10**9):
            pass
        with scans.get_lock():
            scans.value += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    count = args.events - args.events % BATCH
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mlops-bench-log-") as tmp:
        for way in WAYS:
            alone = f"sqlite:///{Path(tmp) / f'alone{way.strip()}.db'}"
            results[f"sqlite write{way}"] = write_rate(alone, count, way)
            results[f"sqlite{way} read window"] = read_rate(alone, count)
            progress(
                f"sqlite{way}: {results[f'sqlite write{way}']:,.0f} events/s written,"
                f" {results[f'sqlite{way} read window']:,.0f}/s read"
            )

            shared = f"sqlite:///{Path(tmp) / f'shared{way.strip()}.db'}"
            get_log_store(shared).write(events(BATCH, 10**8))  # something to scan from the start
            spawn = multiprocessing.get_context("spawn")  # a fresh process, like an Airflow task
            stop, scans = spawn.Event(), spawn.Value("i", 0)
            reader = spawn.Process(target=_scan_forever, args=(shared, stop, scans))
            reader.start()
            time.sleep(1.0)
            try:
                results[f"sqlite write{way} while a reader scans"] = write_rate(shared, count, way)
            finally:
                stop.set()
                reader.join(30)
            progress(
                f"sqlite{way} with a reader process: {results[f'sqlite write{way} while a reader scans']:,.0f}"
                f" events/s ({scans.value} scans meanwhile)"
            )

        from tests.esproxy import ElasticsearchProxy
        from tests.servers import osmem_server

        with osmem_server(Path(tmp)) as osmem, ElasticsearchProxy(osmem.url) as proxy:
            for flavour, url in (
                ("opensearch", f"opensearch://{osmem.url[7:]}"),
                ("elasticsearch", f"elasticsearch://{proxy.url[7:]}"),
            ):
                prefix = f"bench{uuid.uuid4().hex[:8]}"
                results[f"{flavour} write"] = write_rate(url, count, index_prefix=prefix)
                results[f"{flavour} read window"] = read_rate(url, count, index_prefix=prefix)
                prefix = f"bench{uuid.uuid4().hex[:8]}"
                results[f"{flavour} write batches"] = write_rate(url, count, " batches", index_prefix=prefix)
                progress(
                    f"{flavour}: {results[f'{flavour} write']:,.0f} events/s written, {results[f'{flavour} read window']:,.0f}/s read"
                )

    baseline = results["sqlite write"]
    print(f"\n{count:,} events, batches of {BATCH}:\n")
    print("| measurement | events/s | vs sqlite write alone |")
    print("| --- | --- | --- |")
    for name, rate in results.items():
        print(f"| {name} | {rate:,.0f} | {rate / baseline:.2f}x |")
    for way in WAYS:
        target = results[f"sqlite write{way} while a reader scans"]
        print(
            f"\nembedded store written{way or ' events'} while a reader scans: {target:,.0f} events/s"
            f" (target 20,000: {target / 20000:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
