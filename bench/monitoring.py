"""Monitoring benchmark: events per second through the whole step, against the detectors alone.

For windows of 10k, 100k and 1M events (shaped like the demo model's: two numeric features, one
categorical, a label), in the same run:

- **whole step**: the window read from the embedded store (the model server's layout: batches of
  logged V1 requests of 50 rows), streamed into columns, then every check of the version
  (quality with great-expectations, skew, MMD, outliers; the drift and performance checks have
  no previous window here);
- **floor**: the same checks on the same rows, handed over as in-memory arrays.

Printed: events/s of each, the whole step's time as a ratio to the floor's (goal: within 2x at
1M), and the peak resident memory of each (sampled every 20 ms, above what the process held
before). Both backends' decisions are printed side by side (detection quality: bench/detection.py).

    .venv/bin/python -m bench.monitoring [--sizes 10000,100000,1000000] [--backend scipy]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import psutil

from monitoring.checks import MonitorConfig, check_version
from monitoring.detectors import get_detectors
from monitoring.events import RequestBatch, encode_request
from monitoring.logstore import get_log_store
from monitoring.profile import build_profile
from monitoring.window import ArrayWindow, read_window

T0 = 1_790_000_000_000
ROWS_PER_REQUEST = 50
COUNTRIES = ("DE", "FR", "US")


def rows(count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "amount": np.round(rng.lognormal(3.5, 1.0, count), 2),
        "age_days": rng.integers(0, 1500, count).astype(float),
        "country": rng.choice(COUNTRIES, count).astype(object),
    }


def write_window(url: str, columns: dict[str, np.ndarray]) -> None:
    """The rows as the model server logs them: V1 requests of 50 rows, 200 requests a batch."""
    store = get_log_store(url)
    count = len(columns["amount"])
    amounts, ages, countries = (columns[k].tolist() for k in ("amount", "age_days", "country"))
    lines: list[bytes] = []
    first = 0
    for start in range(0, count, ROWS_PER_REQUEST):
        stop = min(start + ROWS_PER_REQUEST, count)
        body = orjson.dumps(
            {
                "instances": [
                    {"amount": amounts[i], "age_days": ages[i], "country": countries[i]}
                    for i in range(start, stop)
                ]
            }
        )
        outputs = {"label": ["legit"] * (stop - start)}
        number = start // ROWS_PER_REQUEST
        lines.append(
            encode_request((T0 + number) / 1000, 0.001, "fraud", "1", "stable", f"r{number}", "v1", body, None, outputs)
            + b"\n"
        )  # fmt: skip
        if len(lines) == 200 or stop == count:
            batch = RequestBatch.scan("bench", first, b"".join(lines))
            assert batch is not None
            store.write_requests([batch])
            first += len(lines)
            lines = []
    store.close()


class PeakMemory:
    """The resident memory's peak above what the process held when it began (sampled)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--backend", default="scipy", choices=("scipy", "alibi"))
    args = parser.parse_args()
    sizes = [int(part) for part in args.sizes.split(",")]
    training = pd.DataFrame(rows(20_000, seed=0))
    profile = build_profile("fraud", "1", training)
    detectors, config = get_detectors(args.backend), MonitorConfig(min_events=2)
    kinds = {feature.name: feature.kind for feature in profile.features}
    print(f"monitoring step, {args.backend} detectors; events/s (higher is better), time ratio to the floor")
    print(
        f"{'events':>9} {'whole step/s':>13} {'floor/s':>10} {'ratio':>6} {'read s':>7} {'peak MiB':>9} {'floor MiB':>9}  decision"
    )
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            url = f"sqlite:///{Path(folder) / f'w{size}.db'}"
            columns = rows(size, seed=size)
            began = time.perf_counter()
            write_window(url, columns)
            print(f"    ({size} events written in {time.perf_counter() - began:.1f} s)", file=sys.stderr)
            check_version(
                ArrayWindow(rows(1000, 1)).as_version("1"), profile, [], config, detectors, 1
            )  # warm
            with PeakMemory() as floor_memory:
                began = time.perf_counter()
                floor = check_version(ArrayWindow(columns).as_version("1"), profile, [], config, detectors, 1)
                floor_s = time.perf_counter() - began
            store = get_log_store(url)
            with PeakMemory() as whole_memory:
                began = time.perf_counter()
                window = read_window(store, "fraud", T0, T0 + size, lambda version: kinds)
                whole = check_version(window.versions["1"], profile, [], config, detectors, 1)
                whole_s = time.perf_counter() - began
            assert window.events == size, window.events
            same = "same" if (whole.status, whole.tripped) == (floor.status, floor.tripped) else "DIFFERENT"
            print(
                f"{size:>9} {size / whole_s:>13,.0f} {size / floor_s:>10,.0f} {whole_s / floor_s:>6.2f}"
                f" {window.read_s:>7.2f} {whole_memory.mib:>9.0f} {floor_memory.mib:>9.0f}  {whole.status} ({same})"
            )
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
