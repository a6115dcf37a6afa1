"""Serving benchmark: our model server against a plain kserve server and a bare ASGI floor.

One run, one machine, the same ONNX models, every figure also printed as a ratio to the baselines
measured in the same run:

- ``plain``: kserve.ModelServer with its defaults around one ONNX Runtime session (no extras);
- ``floor``: Starlette + uvicorn + orjson around the same session (no validation, nothing else);
- ``ours``: ``python -m serving`` with a stable and a canary version (10 % split), validation
  against the signature, metrics, dynamic batching and the inference log (embedded store) on;
- ``ours-nolog``: the same with the inference log off, to show what logging costs;

for a small MLP (16 features) and a compute-heavy wide MLP, at concurrency 1, 16 and 64, driven by
wrk (a C load generator: a Python client would be the bottleneck on a 2-core machine). Also the
raw in-process ONNX Runtime call, for scale.

    .venv/bin/python -m bench.serving [--duration 8] [--models small,wide] [--json results.json]

Needs ``wrk`` (Debian: apt-get install wrk). Not a test: it asserts nothing, it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 16, 64)
MODELS = {
    # name: (features, hidden, layers)
    "small": (16, 32, 1),
    "wide": (256, 2048, 4),
}

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[BODY]==]
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
                 + summary.errors.status + summary.errors.timeout
  io.write(string.format('{"requests": %d, "seconds": %f, "errors": %d, "p50_us": %f, "p99_us": %f}\\n',
    summary.requests, summary.duration / 1e6, errors, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Measure:
    model: str
    server: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process(argv: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv} exited; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"{argv} not ready; see {log}")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def wrk(url: str, body: str, concurrency: int, duration_s: int, work: Path) -> dict:
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT.replace("BODY", body))
    threads = 1 if concurrency == 1 else 2
    done = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration_s}s", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def raw_onnx(model_file: Path, row: list[float], seconds: float = 2.0) -> tuple[float, float]:
    """In-process ONNX Runtime: single-row calls per second, and the single-row latency in ms."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    x = np.asarray([row], dtype=np.float32)
    for _ in range(20):
        session.run(None, {"input": x})
    calls, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        session.run(None, {"input": x})
        calls += 1
    elapsed = time.perf_counter() - began
    return calls / elapsed, 1000 * elapsed / calls


def bench_model(name: str, duration_s: int, work: Path, progress) -> tuple[list[Measure], dict]:
    from serving.examples import save_mlp

    features, hidden, layers = MODELS[name]
    stable = save_mlp(work / f"{name}-v1", features=features, hidden=hidden, layers=layers, seed=1)
    canary = save_mlp(work / f"{name}-v2", features=features, hidden=hidden, layers=layers, seed=2)
    row = [round(0.01 * i, 3) for i in range(features)]
    body = json.dumps({"instances": [row]})
    raw_rps, raw_ms = raw_onnx(stable / "model.onnx", row)
    progress(f"{name}: raw ONNX Runtime single-row call {raw_ms:.3f} ms ({raw_rps:,.0f}/s in process)")

    python = sys.executable
    servers = {}
    port = free_port()
    servers["plain"] = (
        [python, "-m", "bench.servers.plain_kserve", str(stable / "model.onnx"), str(port)],
        f"http://127.0.0.1:{port}",
        "/v2/health/ready",
        None,
    )
    port = free_port()
    servers["floor"] = (
        [python, "-m", "bench.servers.floor", str(stable / "model.onnx"), str(port)],
        f"http://127.0.0.1:{port}",
        "/health",
        None,
    )
    for server, logging_on in (("ours", "true"), ("ours-nolog", "false")):
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")},
            "MLOPS_STATE_DIR": str(work / f"{name}-{server}-state"),
            "MLOPS_SERVING__PORT": str(port),
            "MLOPS_SERVING__ADMIN_TOKEN": "bench",
            "MLOPS_LOGS__ENABLED": logging_on,  # every prediction to the embedded log store
        }
        servers[server] = ([python, "-m", "serving"], f"http://127.0.0.1:{port}", "/v2/health/ready", env)

    measures = []
    for server, (argv, url, ready, server_env) in servers.items():
        with process(argv, url + ready, work / f"{name}-{server}.log", server_env):
            if server.startswith("ours"):
                admin = httpx.Client(
                    base_url=f"{url}/admin/v1/models", headers={"Authorization": "Bearer bench"}, timeout=60
                )
                admin.post(
                    "/bench/versions", json={"version": "1", "uri": str(stable), "role": "stable"}
                ).raise_for_status()
                admin.post(
                    "/bench/versions", json={"version": "2", "uri": str(canary), "role": "canary"}
                ).raise_for_status()
                admin.put("/bench/traffic", json={"canary_percent": 10}).raise_for_status()
            target = f"{url}/v1/models/bench:predict"
            check = httpx.post(target, content=body, headers={"content-type": "application/json"}, timeout=30)
            check.raise_for_status()
            wrk(target, body, 16, 2, work)  # warm-up
            for concurrency in CONCURRENCY:
                result = wrk(target, body, concurrency, duration_s, work)
                measure = Measure(
                    model=name, server=server, concurrency=concurrency,
                    rps=result["requests"] / result["seconds"], p50_ms=result["p50_us"] / 1000,
                    p99_ms=result["p99_us"] / 1000, errors=result["errors"],
                )  # fmt: skip
                measures.append(measure)
                progress(
                    f"{name:5} {server:5} c={concurrency:<3} {measure.rps:9,.0f} req/s  p50 {measure.p50_ms:7.3f} ms"
                    f"  p99 {measure.p99_ms:7.2f} ms  errors {measure.errors}"
                )
    return measures, {"raw_onnx_rps": raw_rps, "raw_onnx_ms": raw_ms}


def report(measures: list[Measure], raw: dict[str, dict]) -> str:
    lines = []
    for model in dict.fromkeys(m.model for m in measures):
        lines.append(
            f"\n**{model} MLP {MODELS[model][:2]}**: raw ONNX Runtime single row {raw[model]['raw_onnx_ms']:.3f} ms\n"
        )
        lines.append(
            "| server | c | req/s | p50 ms | p99 ms | errors | req/s vs plain | req/s vs floor | p50 vs plain |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        by = {(m.server, m.concurrency): m for m in measures if m.model == model}
        for m in (x for x in measures if x.model == model):
            plain, floor = by[("plain", m.concurrency)], by[("floor", m.concurrency)]
            lines.append(
                f"| {m.server} | {m.concurrency} | {m.rps:,.0f} | {m.p50_ms:.3f} | {m.p99_ms:.2f} | {m.errors} "
                f"| {m.rps / plain.rps:.2f}x | {m.rps / floor.rps:.2f}x | {m.p50_ms / plain.p50_ms:.2f}x |"
            )
        for concurrency in CONCURRENCY:
            on, off = by.get(("ours", concurrency)), by.get(("ours-nolog", concurrency))
            if on and off:
                lines.append(
                    f"\nlogging costs {100 * (1 - on.rps / off.rps):.1f} % of throughput at c={concurrency}"
                )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--models", default="small,wide", help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    measures, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="mlops-bench-") as tmp:
        for name in args.models.split(","):
            found, raw[name] = bench_model(name, args.duration, Path(tmp), progress)
            measures += found
    print(report(measures, raw))
    if args.json:
        args.json.write_text(json.dumps({"measures": [asdict(m) for m in measures], "raw": raw}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
