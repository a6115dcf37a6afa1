"""An application's requests for the rollout tests, in both environments (it needs httpx only)."""

from __future__ import annotations

import random
import threading
import time

import httpx


class Load:
    """V1 requests of ``features`` standard-normal values, one after another until the block ends;
    every answer that is not a 200 is kept in ``failures``."""

    def __init__(self, url: str, model: str, features: int = 16, pause_s: float = 0.0) -> None:
        self.url = f"{url}/v1/models/{model}:predict"
        self.features = features
        self.pause_s = pause_s
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-load", daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def failed(self) -> int:
        return len(self.failures)

    def _run(self) -> None:
        rng = random.Random(0)
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                row = [round(rng.gauss(0, 1), 4) for _ in range(self.features)]
                response = http.post(self.url, json={"instances": [row]})
                self.sent += 1
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                if self.pause_s:
                    time.sleep(self.pause_s)
