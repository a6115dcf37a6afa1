"""What logging costs the model server, in instructions per request: a count, not a timing.

On this machine the throughput of the same build moves by up to 3 % between runs, and a median of
6 rounds is only good to about ±1 %: a change of 1 µs in the ~100 µs a small request costs the
server cannot be seen in ``bench.serving``. Instructions can be counted: each server runs
under valgrind's callgrind (the log writer, a child process, runs natively: it runs on the other
core), answers ``--warmup`` requests uncounted, then ``--requests`` counted ones, one at a time
over a keep-alive connection; the figure is the server's instructions (every thread) per counted
request, with the log on against the log off (``ours-nolog``), in the same run.

    .venv/bin/python -m bench.log_instructions [--requests 2000] [--warmup 300] [--model small]
        [--baseline REV] [--variant NAME:ENV=VALUE ...] [--top 15]

``--baseline REV`` counts ``ours`` as it was at a git revision too (``ours-base``);
``--variant NAME:ENV=VALUE`` (e.g. ``flush20:MLOPS_LOGS__FLUSH_MS=20``) counts ``ours`` with an environment variable set.
Instructions are not time (a cache miss costs no instruction): this shows what a change takes out
of the server's work, and the throughput benchmark shows what that is worth. A whole server's
count is not exact either: its threads and timers do not repeat exactly. Two servers of the same
build in one run differed by 0.14 % (2026-11-27); the log-off server of different runs, by up to
1 % before the hash seed was fixed and idle time left out of the count. Under valgrind the
server runs about 50 times slower, so the log's hand-over interval is stretched by ``--slowdown``
to keep the requests per hand-over close to a native run's.

Needs valgrind (Debian: apt-get install valgrind). Not a test: it asserts nothing, it counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.serving import MODELS, ROOT, deploy, export_revision, free_port, ours_env, process, variants_from

READY_S = 600  # the server's imports under valgrind take minutes


def count(
    name: str, argv_env: dict[str, str], source: Path, stable: Path, body: str, args, work: Path, log
) -> tuple[float, dict[str, int]]:
    """Instructions per counted request of one server, and its top functions by their own count."""
    port = free_port()
    env = {**ours_env(work, name, port, argv_env.pop("_log") == "on"), **argv_env}
    env["MLOPS_LOGS__FLUSH_MS"] = str(200 * args.slowdown)
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts, run after run
    out = work / f"{name}.callgrind"
    argv = [
        "valgrind", "--tool=callgrind", "--trace-children=no", "--separate-threads=yes",
        f"--callgrind-out-file={out}", sys.executable, "-m", "serving",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    server = process(argv, url + "/v2/health/ready", work / f"{name}.log", env, source, READY_S, stop_s=120)
    with server as proc:
        log(f"{name}: up under callgrind in {time.monotonic() - began:.0f} s")
        deploy(url, stable)
        target = f"{url}/v1/models/bench:predict"
        headers = {"content-type": "application/json"}
        with httpx.Client(timeout=120) as client:
            for _ in range(args.warmup):
                client.post(target, content=body, headers=headers).raise_for_status()
            control(proc.pid, "--zero")  # what came before (start, imports, warm-up) is not counted
            began = time.monotonic()
            for i in range(args.requests):
                client.post(target, content=body, headers=headers).raise_for_status()
                if (i + 1) % max(1, args.requests // 4) == 0:
                    log(f"{name}: {i + 1}/{args.requests} requests counted")
            seconds = time.monotonic() - began
            control(proc.pid, "--dump")  # the counted requests' instructions: the first dump
    log(f"{name}: {args.requests / seconds:.0f} requests/s under callgrind")
    # The first dump, a file per thread (callgrind's <file>.<dump>-<thread>).
    dumps = sorted(work.glob(f"{name}.callgrind.1-*"))
    if not dumps:
        raise RuntimeError(f"{name}: callgrind left no dump in {work}")
    total, own = 0, {}
    for dump in dumps:
        found = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(errors="replace"), re.M)
        total += int(found.group(1)) if found else 0
        for fn, n in functions(dump).items():
            own[fn] = own.get(fn, 0) + n
    return total / args.requests, own


def control(pid: int, command: str) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], check=True, capture_output=True, timeout=120)


# Callgrind's file format: "fn=(id) name" opens a function's cost lines ("position cost"), a
# name given once and its id alone after that ("cfn=", a callee, names too; "ob="/"cob=" the same
# for objects); the cost line after "calls=" is that call's inclusive cost, not the function's own.
_NAMED = re.compile(r"(c?)(fn|ob)=\((\d+)\)(?: (.*))?")


def functions(dump: Path) -> dict[str, int]:
    """Own instructions by function ("name [object]") in a callgrind dump. Read here, not through
    callgrind_annotate: for a dump made while the server runs, it gives the functions on the
    stack their inclusive cost (the whole thread's, for the interpreter's loop). In a whole run's
    dump these add up to its total; in a dump made while the server runs, to about 4 % more
    (2026-11-27): they say where the instructions went, the total says how many."""
    names: dict[tuple[str, str], str] = {}
    own: dict[str, int] = {}
    obj = fn = ""
    after_call = False
    for line in dump.read_text(errors="replace").splitlines():
        if named := _NAMED.match(line):
            callee, kind, key, name = named.groups()
            if name:
                names[kind, key] = name
            if not callee and kind == "ob":
                obj = Path(names.get((kind, key), "?")).name
            elif not callee:
                fn = f"{names.get((kind, key), '?')} [{obj}]"
        elif line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if after_call:
                after_call = False
            elif fn and len(parts := line.split()) >= 2:
                own[fn] = own.get(fn, 0) + int(parts[1])
    return own


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--model", default="small", choices=sorted(MODELS))
    parser.add_argument("--baseline", help="also count ours as it was at this git revision")
    parser.add_argument("--variant", action="append", default=[], help="NAME:ENV=VALUE (log on)")
    parser.add_argument("--slowdown", type=float, default=50.0, help="the hand-over interval's stretch")
    parser.add_argument("--top", type=int, default=12, help="functions to show where the log adds most")
    parser.add_argument("--work", type=Path, help="keep the work folder here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.warmup < 0:
        parser.error("--requests must be at least 1 and --warmup at least 0")
    variants: list[tuple[str, dict[str, str]]] = [("ours-nolog", {"_log": "off"}), ("ours", {"_log": "on"})]
    variants += [
        (name, {"_log": "on", **env}) for name, env in variants_from(args.variant, parser.error).items()
    ]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from serving.examples import save_mlp

    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-instr-")))
        work.mkdir(parents=True, exist_ok=True)
        features, hidden, layers = MODELS[args.model]
        stable = save_mlp(work / "model", features=features, hidden=hidden, layers=layers, seed=1)
        body = json.dumps({"instances": [[round(0.01 * i, 3) for i in range(features)]]})  # as bench.serving
        sources = {name: ROOT for name, _ in variants}
        if args.baseline:
            variants.append(("ours-base", {"_log": "on"}))
            sources["ours-base"] = export_revision(args.baseline, work / "base", log)
        results = {}
        for name, env in variants:
            results[name] = count(name, dict(env), sources[name], stable, body, args, work, log)
        off, before = results["ours-nolog"]
        print(f"\n**{args.model} MLP**: instructions per request, {args.requests} requests one at a time\n")
        print("| server | instructions/request | vs ours-nolog |")
        print("| --- | --- | --- |")
        for name, (per_request, _) in results.items():
            print(f"| {name} | {per_request:,.0f} | {per_request / off - 1:+.2%} |")
        on, after = results["ours"]
        print(f"\nthe log adds {on - off:,.0f} instructions a request ({on / off - 1:+.2%})")
        if args.baseline:
            base = results["ours-base"][0]
            print(f"ours against ours at {args.baseline}: {on - base:+,.0f} instructions a request "
                  f"({(on - off) / (base - off) - 1:+.1%} of the log's)")  # fmt: skip
        added = sorted(((after.get(fn, 0) - before.get(fn, 0), fn) for fn in {*after, *before}), reverse=True)
        added = added[: args.top]
        print("\nwhere the log adds most (own instructions a request, ours - ours-nolog):\n")
        for n, fn in added:
            print(f"  {n / args.requests:+9,.0f}  {fn[:120]}")


if __name__ == "__main__":
    main()
