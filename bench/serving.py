"""Serving benchmark: our model server against a plain kserve server and a bare ASGI floor.

One run, one machine, the same ONNX models, every figure also printed as a ratio to the baselines
measured in the same run:

- ``plain``: kserve.ModelServer with its defaults around one ONNX Runtime session (no extras);
- ``floor``: Starlette + uvicorn + orjson around the same session (no validation, nothing else);
- ``ours``: ``python -m serving`` with a stable and a canary version (10 % split), validation
  against the signature, metrics, dynamic batching and the inference log (embedded store) on;
- ``ours-nolog``: the same with the inference log off, to show what logging costs;
- ``ours-base`` (with ``--baseline REV``): ``ours`` as it was at git revision REV (its source
  exported to the work folder, run with this environment), so a change is measured against what it
  changed in the same run, cells taking turns, instead of against a figure of another day;
- a ``--variant NAME:ENV=VALUE``: ``ours`` with one more environment variable set (a setting, or
  a switch such as ``MLOPS_LOGS__FLUSH_MS=20``), measured the same way;

for a small MLP (16 features) and a compute-heavy wide MLP, at concurrency 1, 16 and 64, driven by
wrk (a C load generator: a Python client would be the bottleneck on a 2-core machine). Also the
raw in-process ONNX Runtime call, for scale.

    .venv/bin/python -m bench.serving [--duration 8] [--models small,wide] [--json results.json]
        [--servers ours,ours-nolog] [--baseline REV] [--variant NAME:ENV=VALUE] [--server-cpus 0-1 --load-cpus 4-11 --wrk-threads 4]
        [--work DIR]

On a machine with more cores, ``--server-cpus`` pins every server process (and the logger's writer
process, which inherits the affinity) to a few CPUs, the size of the box it is meant for, and
``--load-cpus`` keeps wrk off them, so the load generator does not steal the server's CPU.

Needs ``wrk`` (Debian: apt-get install wrk) and ``taskset`` for pinning. Not a test: it asserts
nothing, it measures.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 16, 64)
SERVERS = ("plain", "floor", "ours", "ours-nolog", "ours-base")
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
    cpu_us: float = 0.0  # CPU time of the server process per answered request
    cpu_us_children: float = 0.0  # of its children (our log writer) per answered request


@dataclass(frozen=True)
class Load:
    """How wrk drives the servers: which CPUs the servers and wrk may use, and wrk's threads."""

    server_cpus: str | None = None  # a taskset list (0-1), None: not pinned
    load_cpus: str | None = None
    wrk_threads: int = 2

    def server(self, argv: list[str]) -> list[str]:
        return pinned(argv, self.server_cpus)


ADMIN_TOKEN = "bench-admin-token-0001"  # the servers' admin API (16 characters at least)


def cpu_list(spec: str | None, progress=None) -> str | None:
    """A taskset CPU list clamped to the CPUs this process may use (all of them when none is left)."""
    if not spec:
        return None
    wanted: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        wanted.update(range(int(first), int(last or first) + 1))
    usable = os.sched_getaffinity(0)
    kept = sorted(wanted & usable) or sorted(usable)
    clamped = ",".join(map(str, kept))
    if progress is not None and set(kept) != wanted:
        progress(f"bench: CPUs {spec} are not all here; using {clamped}")
    return clamped


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process(
    argv: list[str],
    ready_url: str,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    ready_s: float = 90,
    stop_s: float = 20,
) -> Iterator[subprocess.Popen[bytes]]:
    """A server, ready within ``ready_s``; stopped on leaving (killed after ``stop_s``). ``cwd`` is
    where ``python -m`` finds its packages."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv} exited; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"{argv} not ready in {ready_s:.0f} s; see {log}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            proc.kill()


def wrk(url: str, body: str, concurrency: int, duration_s: int, work: Path, load: Load = Load()) -> dict:
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT.replace("BODY", body))
    threads = max(1, min(load.wrk_threads, concurrency))
    argv = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration_s}s", "-s", str(script), url]
    done = subprocess.run(pinned(argv, load.load_cpus), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time used so far by a server, and by its live children (the log writers). The worker
    processes of ``MLOPS_SERVING__WORKERS`` count as the server's own."""
    import psutil

    proc = psutil.Process(pid)
    own = sum(proc.cpu_times()[:2])
    children = 0.0
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            used = sum(child.cpu_times()[:2])
            if "serving.workers" in child.cmdline():
                own += used
            else:
                children += used
    return own, children


def measure(
    model: str, server: str, target: str, body: str, duration_s: int, work: Path, load: Load, progress,
    pid: int | None = None,
) -> list[Measure]:  # fmt: skip
    """wrk against one server: a warm-up, then each concurrency (with the server's CPU per request)."""
    wrk(target, body, 16, 2, work, load)  # warm-up
    return [
        cell(model, server, target, body, concurrency, duration_s, work, load, progress, pid)
        for concurrency in CONCURRENCY
    ]


def cell(
    model: str, server: str, target: str, body: str, concurrency: int, duration_s: int, work: Path,
    load: Load, progress, pid: int | None = None,
) -> Measure:  # fmt: skip
    """One wrk run at one concurrency; then, for our server, the wait until its log writer has
    caught up (its CPU stops moving), so that work left over never lands in the next cell."""
    before = cpu_seconds(pid) if pid else (0.0, 0.0)
    result = wrk(target, body, concurrency, duration_s, work, load)
    if pid:
        settle(pid)
    after = cpu_seconds(pid) if pid else (0.0, 0.0)
    answered = max(1, result["requests"])
    m = Measure(
        model=model, server=server, concurrency=concurrency,
        rps=result["requests"] / result["seconds"], p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000, errors=result["errors"],
        cpu_us=1e6 * (after[0] - before[0]) / answered, cpu_us_children=1e6 * (after[1] - before[1]) / answered,
    )  # fmt: skip
    progress(
        f"{model:5} {server:10} c={concurrency:<3} {m.rps:9,.0f} req/s  p50 {m.p50_ms:7.3f} ms"
        f"  p99 {m.p99_ms:7.2f} ms  errors {m.errors}  cpu/request {m.cpu_us:.0f} us"
        f" (+{m.cpu_us_children:.0f} us children)"
    )
    return m


def settle(pid: int, timeout_s: float = 20.0) -> None:
    """Wait until the children of ``pid`` (the log writer) have used no CPU for 0.3 s."""
    deadline = time.monotonic() + timeout_s
    last = cpu_seconds(pid)[1]
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = cpu_seconds(pid)[1]
        if now - last < 0.003:
            return
        last = now


def ours_env(work: Path, name: str, port: int, logging_on: bool) -> dict[str, str]:
    """The environment of ``python -m serving`` in the benchmark: its own state, the admin token."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")},
        "MLOPS_STATE_DIR": str(work / f"{name}-state"),
        "MLOPS_SERVING__PORT": str(port),
        "MLOPS_SERVING__ADMIN_TOKEN": ADMIN_TOKEN,
        "MLOPS_LOGS__ENABLED": "true" if logging_on else "false",  # every prediction to the log store
    }


def deploy(url: str, stable: Path, canary: Path | None = None) -> None:
    """Our server: the model ``bench``, one stable version and, when given, a 10 % canary."""
    admin = httpx.Client(
        base_url=f"{url}/admin/v1/models", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120
    )
    with admin:
        calls = [("POST", "/bench/versions", {"version": "1", "uri": str(stable), "role": "stable"})]
        if canary is not None:
            calls.append(("POST", "/bench/versions", {"version": "2", "uri": str(canary), "role": "canary"}))
            calls.append(("PUT", "/bench/traffic", {"canary_percent": 10}))
        for method, path, body in calls:
            answer = admin.request(method, path, json=body)
            if answer.is_error:  # the server's own words say why (a model that does not load, ...)
                raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text[:1000]}")


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


def bench_model(
    name: str,
    duration_s: int,
    work: Path,
    progress,
    servers_wanted: tuple[str, ...] = SERVERS,
    load: Load = Load(),
    rounds: int = 1,
    baseline: Path | None = None,
    variants: dict[str, dict[str, str]] | None = None,
) -> tuple[list[Measure], dict]:
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
        ROOT,
    )
    port = free_port()
    servers["floor"] = (
        [python, "-m", "bench.servers.floor", str(stable / "model.onnx"), str(port)],
        f"http://127.0.0.1:{port}",
        "/health",
        None,
        ROOT,
    )
    ours = [("ours", True, ROOT), ("ours-nolog", False, ROOT)] + (
        [("ours-base", True, baseline)] if baseline else []
    )
    variants = variants or {}
    ours += [(variant, True, ROOT) for variant in variants]
    for server, logging_on, source in ours:
        port = free_port()
        env = {**ours_env(work, f"{name}-{server}", port, logging_on), **variants.get(server, {})}
        servers[server] = (
            [python, "-m", "serving"], f"http://127.0.0.1:{port}", "/v2/health/ready", env, source
        )  # fmt: skip

    measures = []
    wanted = [server for server in servers if server in servers_wanted or server in variants]
    with contextlib.ExitStack() as running:
        # Every server up at once (an idle one costs nothing), then one cell at a time, taking
        # turns: ours c=1, ours-nolog c=1, ..., so a slow spell of the machine hits both sides;
        # each round starts with the next server, so none is always measured after another.
        pids, targets = {}, {}
        for server in wanted:
            argv, url, ready, server_env, source = servers[server]
            log = work / f"{name}-{server}.log"
            started = process(load.server(argv), url + ready, log, server_env, source)
            pids[server] = running.enter_context(started).pid
            if server.startswith("ours") or server in variants:
                deploy(url, stable, canary)
            targets[server] = f"{url}/v1/models/bench:predict"
            check = httpx.post(
                targets[server], content=body, headers={"content-type": "application/json"}, timeout=30
            )
            check.raise_for_status()
            wrk(targets[server], body, 16, 2, work, load)  # warm-up
        for turn in range(rounds):
            order = wanted[turn % len(wanted) :] + wanted[: turn % len(wanted)]  # each goes first in turn
            for concurrency in CONCURRENCY:
                for server in order:
                    measures.append(
                        cell(
                            name,
                            server,
                            targets[server],
                            body,
                            concurrency,
                            duration_s,
                            work,
                            load,
                            progress,
                            pids[server],
                        )  # fmt: skip
                    )
    return measures, {"raw_onnx_rps": raw_rps, "raw_onnx_ms": raw_ms}


def ratios(
    m: Measure, by: dict[tuple[str, int], Measure], rps_against: Sequence[str], p50_against: Sequence[str]
) -> list[str]:
    """Table cells: m's requests per second, then its p50, as ratios to baselines at its concurrency."""
    cells = [f"{m.rps / by[(b, m.concurrency)].rps:.2f}x" for b in rps_against]
    return cells + [f"{m.p50_ms / by[(b, m.concurrency)].p50_ms:.2f}x" for b in p50_against]


def compare(
    by: dict[tuple[str, int], Measure], first: str, second: str, line: Callable[[int, Measure, Measure], str]
) -> list[str]:
    """One line per concurrency at which both servers were measured."""
    pairs = ((c, by.get((first, c)), by.get((second, c))) for c in CONCURRENCY)
    return [line(c, a, b) for c, a, b in pairs if a is not None and b is not None]


def spread(on: list[float], off: list[float]) -> str:
    """The cost of logging round by round (the two cells of a round were measured back to back)."""
    if len(on) < 2:
        return ""
    costs = [100 * (1 - a / b) for a, b in zip(on, off, strict=False)]
    return f" (rounds {min(costs):.1f} to {max(costs):.1f} %)"


def medians(measures: list[Measure]) -> list[Measure]:
    """One measure per (model, server, concurrency): the median of its rounds, field by field."""
    groups: dict[tuple[str, str, int], list[Measure]] = {}
    for m in measures:
        groups.setdefault((m.model, m.server, m.concurrency), []).append(m)
    return [
        Measure(
            model,
            server,
            concurrency,
            *(float(np.median([getattr(m, f) for m in group])) for f in ("rps", "p50_ms", "p99_ms")),
            sum(m.errors for m in group),
            *(float(np.median([getattr(m, f) for m in group])) for f in ("cpu_us", "cpu_us_children")),
        )  # fmt: skip
        for (model, server, concurrency), group in groups.items()
    ]


def report(
    measures: list[Measure], raw: dict[str, dict], baseline: str | None = None, variants: Sequence[str] = ()
) -> str:
    rounds: dict[tuple[str, str, int], list[float]] = {}  # each round's req/s, in round order
    for m in measures:
        rounds.setdefault((m.model, m.server, m.concurrency), []).append(m.rps)
    measures = medians(measures)
    lines = []
    for model in dict.fromkeys(m.model for m in measures):
        lines.append(
            f"\n**{model} MLP {MODELS[model][:2]}**: raw ONNX Runtime single row {raw[model]['raw_onnx_ms']:.3f} ms\n"
        )
        by = {(m.server, m.concurrency): m for m in measures if m.model == model}
        # The ratios are to the baselines measured in this run: plain kserve, the ASGI floor, and
        # our server without its inference log when only ours ran.
        present = {m.server for m in measures if m.model == model}
        baselines = [b for b in ("plain", "floor") if b in present] or [
            b for b in ("ours-nolog",) if b in present and len(present) > 1
        ]
        header = ["server", "c", "req/s", "p50 ms", "p99 ms", "errors", "CPU µs/req (+children)"]
        header += [f"req/s vs {b}" for b in baselines] + [f"p50 vs {b}" for b in baselines[:1]]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + " --- |" * len(header))
        for m in (x for x in measures if x.model == model):
            cells = [m.server, str(m.concurrency), f"{m.rps:,.0f}", f"{m.p50_ms:.3f}", f"{m.p99_ms:.2f}"]
            cells += [str(m.errors), f"{m.cpu_us:.0f} (+{m.cpu_us_children:.0f})"]
            lines.append("| " + " | ".join(cells + ratios(m, by, baselines, baselines[:1])) + " |")
        lines += compare(
            by, "ours", "ours-nolog",
            lambda c, on, off, model=model: f"\nlogging costs {100 * (1 - on.rps / off.rps):.1f} % of throughput at c={c}"
            f"{spread(rounds[(model, 'ours', c)], rounds[(model, 'ours-nolog', c)])}"
            f" (p50 {on.p50_ms / off.p50_ms:.2f}x, p99 {on.p99_ms / off.p99_ms:.2f}x of ours-nolog)",
        )  # fmt: skip
        # Other builds of ours: the revision of --baseline, the --variants (none measured: no line).
        others = [("ours-base", f"at {baseline}, logging cost", f"ours at {baseline}")]
        others += [(variant, f"{variant}: logging costs", variant) for variant in variants]
        its_rounds = {(server, c): r for (m, server, c), r in rounds.items() if m == model}
        for other, cost_label, label in others:
            lines += against(by, its_rounds, other, cost_label, label)
    return "\n".join(lines)


def against(
    by: dict[tuple[str, int], Measure],
    rounds: dict[tuple[str, int], list[float]],
    other: str,
    cost_label: str,
    label: str,
) -> list[str]:
    """Lines for another build of ours (``ours-base``, a ``--variant``): what logging costs it, and
    how many requests ours serves against it, at each concurrency."""
    lines = compare(
        by, other, "ours-nolog",
        lambda c, on, off: f"\n{cost_label} {100 * (1 - on.rps / off.rps):.1f} % at c={c}"
        f"{spread(rounds[(other, c)], rounds[('ours-nolog', c)])}",
    )  # fmt: skip
    return lines + compare(
        by, "ours", other,
        lambda c, new, old: f"\nours serves {100 * (new.rps / old.rps - 1):+.1f} % of the requests of {label}"
        f" at c={c}{spread(rounds[(other, c)], rounds[('ours', c)])}"
        f" (CPU µs/req {new.cpu_us:.0f} (+{new.cpu_us_children:.0f}) against {old.cpu_us:.0f}"
        f" (+{old.cpu_us_children:.0f}))",
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--models", default="small,wide", help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each server this many times, taking turns; report medians",
    )
    add_load_options(parser)
    parser.add_argument(
        "--servers",
        default=",".join(s for s in SERVERS if s != "ours-base"),  # that one needs --baseline
        help=f"comma-separated, of {','.join(SERVERS)}",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run ours as it was at this git revision (server ours-base), cells taking turns",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:ENV=VALUE",
        help="also run ours with this environment variable set, as server NAME (repeatable)",
    )
    args = parser.parse_args()
    variants = variants_from(args.variant, parser.error)
    servers = tuple(args.servers.split(","))
    if args.baseline and "ours-base" not in servers:
        servers += ("ours-base",)
    if unknown := set(servers) - set(SERVERS) or set(args.models.split(",")) - set(MODELS):
        parser.error(f"unknown server or model: {', '.join(sorted(unknown))}")
    if "ours-base" in servers and not args.baseline:
        parser.error("--servers ours-base needs --baseline REV")
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if (missing := missing_tools(args)) is not None:
        progress(missing)
        return 2
    load = load_from(args, progress)
    measures, raw = [], {}
    with work_dir(args.work) as work:
        baseline = export_revision(args.baseline, work, parser.error) if args.baseline else None
        for name in args.models.split(","):
            found, raw[name] = bench_model(
                name, args.duration, work, progress, servers, load, args.rounds, baseline, variants
            )  # fmt: skip
            measures += found
    print(report(measures, raw, args.baseline, tuple(variants)))
    if args.json:
        args.json.write_text(json.dumps({"measures": [asdict(m) for m in measures], "raw": raw}, indent=2))
    return 0


def variants_from(specs: Sequence[str], error: Callable[[str], object]) -> dict[str, dict[str, str]]:
    """``--variant NAME:ENV=VALUE`` options: NAME's environment on top of ours' (repeat a NAME to
    set several variables)."""
    variants: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, _, assignment = spec.partition(":")
        key, eq, value = assignment.partition("=")
        if not name or not key or not eq or name in SERVERS:
            error(f"--variant {spec!r}: expected NAME:ENV=VALUE, NAME not one of {', '.join(SERVERS)}")
        variants.setdefault(name, {})[key] = value
    return variants


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The options every wrk-driven benchmark shares: pinning, wrk's threads, where files go."""
    parser.add_argument("--server-cpus", help="taskset CPU list for the server processes (e.g. 0-1)")
    parser.add_argument("--load-cpus", help="taskset CPU list for wrk (e.g. 4-11)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (at most one per connection)")
    parser.add_argument("--work", type=Path, help="keep models and server logs here (default: a temp dir)")


def missing_tools(args: argparse.Namespace) -> str | None:
    if shutil.which("wrk") is None:
        return "bench: wrk is not installed (Debian: apt-get install wrk)"
    if (args.server_cpus or args.load_cpus) and shutil.which("taskset") is None:
        return "bench: taskset is not installed (Debian: util-linux)"
    return None


def load_from(args: argparse.Namespace, progress) -> Load:
    load = Load(cpu_list(args.server_cpus, progress), cpu_list(args.load_cpus, progress), args.wrk_threads)
    if load.server_cpus or load.load_cpus:
        progress(f"bench: servers on CPUs {load.server_cpus or 'any'}, wrk on CPUs {load.load_cpus or 'any'}")
    return load


def export_revision(rev: str, work: Path, error: Callable[[str], object]) -> Path:
    """This repository's tree at ``rev``, exported under ``work`` (git archive: no checkout touched)."""
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        capture_output=True, text=True,
    )  # fmt: skip
    if found.returncode != 0:
        error(f"--baseline: {rev!r} is not a git revision of {ROOT}")
    commit = found.stdout.strip()
    tree = work / f"source-{commit[:12]}"
    if not (tree / "serving").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


@contextlib.contextmanager
def work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="mlops-bench-") as tmp:
        yield Path(tmp)


if __name__ == "__main__":
    raise SystemExit(main())
