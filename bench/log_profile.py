"""Where logging's cost lands in the model server: `perf` profiles of the server with the log on
and off, under the same load, in CPU microseconds per answered request.

Two model servers (the small MLP, a stable and a 10 % canary, as in bench/serving.py), one with the
inference log on and one with it off, take turns under wrk for ``--rounds`` rounds; during each
turn ``perf record`` samples the server process (all its threads, user and kernel; not the log
writer, a process of its own). The report gives, per shared object and per symbol, the CPU time
per request with the log on, off, and the difference, and the whole as a ratio of log-on to
log-off (the baseline, measured in the same run). It needs `perf` (Debian: linux-perf) and wrk.

    .venv/bin/python -m bench.log_profile [--concurrency 16] [--seconds 6] [--rounds 2] [--top 15]

Samples are of the CPU clock (a virtual machine often has no hardware counters), so the figures
say where time goes, not why (cache misses cannot be counted there).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.serving import MODELS, deploy, free_port, ours_env, process, wrk

HZ = 4000
_LINE = re.compile(r"\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[.\]\s+(.*)")


def profile(pid: int, target: str, body: str, concurrency: int, seconds: int, work: Path, out: Path) -> int:
    """Requests answered while ``perf record`` sampled ``pid`` (wrk runs a second longer)."""
    argv = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(HZ), "-p", str(pid), "-o", str(out)]
    perf = subprocess.Popen([*argv, "--", "sleep", str(seconds)], stdout=subprocess.DEVNULL)
    result = wrk(target, body, concurrency, seconds + 1, work)
    perf.wait()
    return int(result["requests"] * seconds / (seconds + 1))


def samples(data: Path) -> collections.Counter[tuple[str, str]]:
    """(shared object, symbol) -> samples, from a perf.data file."""
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio", "-q",
         "-F", "overhead,sample,dso,sym"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in report.splitlines():
        if match := _LINE.match(line):
            counts[(match.group(2), match.group(3).strip())] += int(match.group(1))
    return counts


def per_request(counts: collections.Counter[tuple[str, str]], requests: int) -> dict[tuple[str, str], float]:
    return {key: n / HZ / max(1, requests) * 1e6 for key, n in counts.items()}


def report(on: dict[tuple[str, str], float], off: dict[tuple[str, str], float], top: int) -> str:
    def by_object(figures: dict[tuple[str, str], float]) -> dict[str, float]:
        totals: dict[str, float] = collections.defaultdict(float)
        for (dso, _), us in figures.items():
            totals[dso] += us
        return totals

    total_on, total_off = sum(on.values()), sum(off.values())
    lines = [
        f"server CPU per request: log on {total_on:.1f} µs, log off {total_off:.1f} µs"
        f" ({total_on / total_off:.3f}x; the log's share {total_on - total_off:+.1f} µs)",
        "",
        "| shared object | on µs/req | off µs/req | difference |",
        "| --- | --- | --- | --- |",
    ]
    objects_on, objects_off = by_object(on), by_object(off)
    for dso in sorted(set(objects_on) | set(objects_off), key=lambda d: -abs(objects_on.get(d, 0) - objects_off.get(d, 0)))[:top]:  # fmt: skip
        a, b = objects_on.get(dso, 0.0), objects_off.get(dso, 0.0)
        lines.append(f"| {dso} | {a:.2f} | {b:.2f} | {a - b:+.2f} |")
    lines += ["", "| symbol | on µs/req | off µs/req | difference |", "| --- | --- | --- | --- |"]
    for key in sorted(set(on) | set(off), key=lambda k: -(on.get(k, 0) - off.get(k, 0)))[:top]:
        a, b = on.get(key, 0.0), off.get(key, 0.0)
        lines.append(f"| {key[1][:60]} ({Path(key[0]).name[:30]}) | {a:.2f} | {b:.2f} | {a - b:+.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=6, help="seconds sampled per turn")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    args = parser.parse_args()
    for tool in ("perf", "wrk"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    from serving.examples import save_mlp

    features, hidden, layers = MODELS["small"]
    with tempfile.TemporaryDirectory(prefix="mlops-log-profile-") as tmp, contextlib.ExitStack() as running:
        work = Path(tmp)
        stable = save_mlp(work / "v1", features=features, hidden=hidden, layers=layers, seed=1)
        canary = save_mlp(work / "v2", features=features, hidden=hidden, layers=layers, seed=2)
        body = json.dumps({"instances": [[round(0.01 * i, 3) for i in range(features)]]})
        servers = {}
        for side, logging_on in (("on", True), ("off", False)):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = ours_env(work, side, port, logging_on)
            started = process(
                [sys.executable, "-m", "serving"], f"{url}/v2/health/ready", work / f"{side}.log", env
            )
            pid = running.enter_context(started).pid  # fmt: skip
            deploy(url, stable, canary)
            servers[side] = (pid, f"{url}/v1/models/bench:predict")
            wrk(servers[side][1], body, 16, 2, work)  # warm-up
        counts = {side: collections.Counter[tuple[str, str]]() for side in servers}
        answered = dict.fromkeys(servers, 0)
        for turn in range(args.rounds):
            for side in list(servers)[turn % 2 :] + list(servers)[: turn % 2]:  # each goes first in turn
                pid, target = servers[side]
                data = work / f"{side}-{turn}.data"
                answered[side] += profile(pid, target, body, args.concurrency, args.seconds, work, data)
                counts[side] += samples(data)
                print(f"round {turn + 1}: log {side}, {answered[side]:,} requests so far", file=sys.stderr)
    print(f"small model, c={args.concurrency}, {args.rounds} rounds of {args.seconds} s, {HZ} samples/s\n")
    print(
        report(
            per_request(counts["on"], answered["on"]), per_request(counts["off"], answered["off"]), args.top
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
