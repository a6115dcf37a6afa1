"""Detection quality: false alarms and detections on synthetic traffic with known properties.

The traffic goes through the real model server (`python -m serving`, the example fraud MLP with
its transformer, every prediction logged to its embedded store), and each window is read back
from that store, as `monitor_model` reads it. Against a profile of 20,000 training rows:

- **false alarms**: seeded windows without a shift, at 1k and at 100k events: the share that
  trips (goal: at most 5 % at both sizes);
- **detection**, at 1k events: a 0.5 standard-deviation mean shift of `age_days`, a new
  categorical value of `country` (5 % of rows), and 5 % injected outliers; the share of seeds
  that trip and name what moved (goal: at least 95 %).

Both backends decide every window; their decisions are printed side by side (``agree``).

    .venv/bin/python -m bench.detection [--seeds 20] [--large 100000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from bench.serving import ADMIN_TOKEN, free_port, process
from monitoring.checks import MonitorConfig, check_version
from monitoring.detectors import get_detectors
from monitoring.logstore import get_log_store
from monitoring.profile import build_profile
from monitoring.window import read_window

COUNTRIES = ("DE", "FR", "US")
AGE_SD = 300.0
BATCH = 500  # rows per request


def rows(count: int, seed: int, shift: str | None) -> list[dict]:
    rng = np.random.default_rng(seed)
    amount, age = rng.lognormal(3.5, 1.0, count), rng.normal(400, AGE_SD, count)
    country = rng.choice(COUNTRIES, count).astype(object)
    if shift == "mean":
        age = age + 0.5 * AGE_SD
    elif shift == "category":
        country[rng.random(count) < 0.05] = "BR"
    elif shift == "outliers":
        out = rng.random(count) < 0.05
        amount[out] = amount[out] + 3_000
        age[out] = age[out] + 6 * AGE_SD
    return [
        {"amount": round(float(a), 2), "age_days": round(float(g), 1), "country": str(c)}
        for a, g, c in zip(amount, age, country, strict=True)
    ]


# Each case: (name, rows per window, shift, what a detection must name).
CASES = [
    ("no shift, 1k", 1_000, None, None),
    ("no shift, large", None, None, None),
    ("mean shift 0.5 SD (age_days), 1k", 1_000, "mean", "skew:age_days"),
    ("new category (country), 1k", 1_000, "category", "country"),
    ("5 % outliers, 1k", 1_000, "outliers", "outliers:rows"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--large", type=int, default=100_000, help="events of the large no-shift windows")
    args = parser.parse_args()
    from serving.examples import fraud_transformer, save_mlp

    training = pd.DataFrame(rows(20_000, seed=0, shift=None))
    profile = build_profile("bench", "1", training)
    kinds = {feature.name: feature.kind for feature in profile.features}
    config = MonitorConfig(min_events=500)
    backends = {name: get_detectors(name) for name in ("scipy", "alibi")}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = save_mlp(work / "model", transformer=fraud_transformer())
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")},
            "MLOPS_STATE_DIR": str(work / "state"),
            "MLOPS_SERVING__PORT": str(port),
            "MLOPS_SERVING__ADMIN_TOKEN": ADMIN_TOKEN,
            "MLOPS_SERVING__MAX_REQUEST_ROWS": str(BATCH),
            "MLOPS_LOGS__QUEUE_EVENTS": "1000000",  # a 100k-row window in one burst: none dropped
        }
        url = f"http://127.0.0.1:{port}"
        with process([sys.executable, "-m", "serving"], f"{url}/v2/health/ready", work / "serving.log", env):
            answer = httpx.post(
                f"{url}/admin/v1/models/bench/versions",
                json={"version": "1", "uri": str(model), "role": "stable"},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=120,
            )
            answer.raise_for_status()
            store = get_log_store(f"sqlite:///{work / 'state' / 'logs' / 'inference.db'}")
            windows: dict[str, list[tuple[int, int]]] = {}
            with httpx.Client(timeout=60) as client:
                for name, size, shift, _ in CASES:
                    began = time.perf_counter()
                    for seed in range(args.seeds):
                        batch = rows(
                            size or args.large,
                            seed=1000 * (1 + CASES.index((name, size, shift, _))) + seed,
                            shift=shift,
                        )
                        start = time.time_ns() // 1_000_000
                        for first in range(0, len(batch), BATCH):
                            sent = client.post(
                                f"{url}/v1/models/bench:predict",
                                json={"instances": batch[first : first + BATCH]},
                            )
                            sent.raise_for_status()
                        end = time.time_ns() // 1_000_000 + 1
                        windows.setdefault(name, []).append((start, end))
                        # Each window logged before the next is sent: the log writer's queue
                        # (MLOPS_LOGS__QUEUE_EVENTS) drops what a burst of 100k rows overflows.
                        deadline = time.monotonic() + 120
                        while store.count("bench", start, end) < len(batch) and time.monotonic() < deadline:
                            time.sleep(0.2)
                        time.sleep(0.002)  # windows never share a millisecond
                    print(
                        f"    {name}: {args.seeds} windows sent in {time.perf_counter() - began:.1f} s",
                        file=sys.stderr,
                    )
            total = sum(size or args.large for _, size, _, _ in CASES) * args.seeds
            print(
                f"    {store.count('bench', 0, 2**62)} of {total} rows sent are in the log", file=sys.stderr
            )
        print(f"detection quality over {args.seeds} seeds per case, windows read back from the log store")
        print(f"{'case':<36} {'events':>7} {'scipy':>7} {'alibi':>7} {'named':>7} {'agree':>6}  goal")
        sizes: dict[str, list[int]] = {}
        for name, _size, shift, names in CASES:
            trips = {backend: 0 for backend in backends}
            named = agree = 0
            for seed, (start, end) in enumerate(windows[name]):
                window = read_window(store, "bench", start, end, lambda version: kinds)
                rows_window = window.versions["1"]
                sizes.setdefault(name, []).append(rows_window.count)
                decided = {}
                for backend, detectors in backends.items():
                    result = check_version(rows_window, profile, [], config, detectors, seed)
                    decided[backend] = (result.status, result.tripped)
                    trips[backend] += result.status == "tripped"
                    if backend == "scipy" and names and any(names in key for key in result.tripped):
                        named += 1
                agree += decided["scipy"] == decided["alibi"]
            n = len(windows[name])
            goal = "<= 5 % trip" if shift is None else ">= 95 % trip, named"
            events = round(np.mean(sizes[name]))
            print(
                f"{name:<36} {events:>7} {trips['scipy'] / n:>7.0%} {trips['alibi'] / n:>7.0%}"
                f" {(named / n if names else 0):>7.0%} {agree / n:>6.0%}  {goal}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
