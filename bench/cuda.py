"""Serving on CUDA: our model server computing the wide MLP with PyTorch on the GPU, and on the CPU.

One run, one machine, the same weights (the ``wide`` model of bench/serving.py: 256 features,
4 layers of 2048) served by ``python -m serving`` as

- ``torch-cuda``: an exported program (torch.export, ``data/model.pt2``), PyTorch on the GPU;
- ``torch-cpu``: the same with ``CUDA_VISIBLE_DEVICES=`` (PyTorch on the CPU);
- ``onnx-cpu``: the same model as ONNX through ONNX Runtime's CPU provider (bench/serving.py's);

at concurrency 1, 16 and 64 (wrk), one stable version, the inference log off (its cost is
bench/serving.py's ours against ours-nolog). Every figure is also a ratio to torch-cpu and onnx-cpu
measured in the same run. The model is exported here, by this host's PyTorch, once per device it
is served on: an exported program is for the PyTorch version that made it. Each server's provider
is read back from its V2 metadata and its log, so a GPU figure is one the GPU served, and its
predictions are compared with ONNX Runtime's.

    python -m bench.cuda [--duration 8] [--server-cpus 0-1 --load-cpus 4-11 --wrk-threads 4]
        [--work DIR] [--json results.json] [--require-cuda]

Needs torch, ``wrk`` and, for pinning, ``taskset``. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from bench.serving import (
    MODELS,
    Load,
    Measure,
    add_load_options,
    compare,
    deploy,
    free_port,
    load_from,
    measure,
    missing_tools,
    ours_env,
    process,
    ratios,
    raw_onnx,
    work_dir,
)

MODEL = "wide"
CONFIGS = ("torch-cuda", "torch-cpu", "onnx-cpu")
BASELINES = ("torch-cpu", "onnx-cpu")
CHECK_ROWS = 8
# ``python -m serving`` with the INFO lines of its own loggers shown (kserve's logging setup shows
# kserve's only): among them the one that names the provider each version loaded on.
SERVE = (
    "import logging, runpy\n"
    "handler = logging.StreamHandler()\n"
    "handler.setFormatter(logging.Formatter('%(asctime)s %(process)d %(name)s %(levelname)s %(message)s'))\n"
    "logging.getLogger('serving').addHandler(handler)\n"
    "logging.getLogger('serving').setLevel(logging.INFO)\n"
    "runpy.run_module('serving', run_name='__main__', alter_sys=True)\n"
)


def onnx_weights(model_file: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """The MLP's weights as bench/serving.py's ONNX graph holds them: (w, b) per layer, and w_out."""
    import onnx
    from onnx import numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model_file)).graph.initializer}
    layers = sum(1 for name in found if name.startswith("b"))
    return [(found[f"w{i}"], found[f"b{i}"]) for i in range(layers)], found["w_out"]


def save_torch_mlp(path: Path, onnx_dir: Path, device: str) -> Path:
    """The ONNX version's MLP as an MLflow pytorch model directory: an exported program made on
    ``device``, in ``data/model.pt2``, with the ONNX version's signature (what serving/bundle.py reads).
    """
    import torch

    layers, w_out = onnx_weights(onnx_dir / "model.onnx")

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.ModuleList()
            for w, b in layers:
                linear = torch.nn.Linear(*w.shape)
                linear.weight.data = torch.from_numpy(np.ascontiguousarray(w.T))
                linear.bias.data = torch.from_numpy(b.copy())
                self.hidden.append(linear)
            self.out = torch.nn.Linear(*w_out.shape, bias=False)
            self.out.weight.data = torch.from_numpy(np.ascontiguousarray(w_out.T))

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            x = input
            for linear in self.hidden:
                x = torch.relu(linear(x))
            return torch.softmax(self.out(x), dim=1)

    module = MLP().eval().to(device)
    example = torch.zeros(2, layers[0][0].shape[0], device=device)
    batch = torch.export.Dim("batch", min=1, max=65536)
    exported = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    (path / "data").mkdir(parents=True, exist_ok=True)
    torch.export.save(exported, str(path / "data" / "model.pt2"))
    mlmodel = yaml.safe_load((onnx_dir / "MLmodel").read_text())
    flavor = {"model_data": "data", "pytorch_version": str(torch.__version__), "export_device": device}
    (path / "MLmodel").write_text(
        yaml.safe_dump({"flavors": {"pytorch": flavor}, "signature": mlmodel["signature"]}, sort_keys=False)
    )
    return path


def raw_torch(model_file: Path, device: str, features: int, seconds: float = 2.0) -> float:
    """In-process single-row latency in ms of the exported program (results copied back to the host)."""
    import torch

    module = torch.export.load(str(model_file)).module().to(device)
    x = torch.full((1, features), 0.01, device=device)
    with torch.inference_mode():
        for _ in range(20):
            module(x).cpu()
        calls, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            module(x).cpu()
            calls += 1
    return 1000 * (time.perf_counter() - began) / calls


def provider_of(url: str, log: Path) -> tuple[str, str]:
    """What computes, as the server's V2 metadata says, and as its log says."""
    meta = httpx.get(f"{url}/v2/models/bench", timeout=30).raise_for_status().json()
    said = meta["parameters"]["providers"].get("1", "?")
    logged = next((line.strip() for line in log.read_text().splitlines() if "loaded as stable" in line), "")
    return said, logged


def export_all(onnx_dir: Path, work: Path, cuda: bool, progress) -> dict[str, Path]:
    """The three versions; the GPU's exported on the GPU (on the CPU if that fails: the server moves it)."""
    began = time.perf_counter()
    bundles = {
        "torch-cpu": save_torch_mlp(work / f"{MODEL}-torch-cpu", onnx_dir, "cpu"),
        "onnx-cpu": onnx_dir,
    }
    try:
        bundles["torch-cuda"] = save_torch_mlp(
            work / f"{MODEL}-torch-cuda", onnx_dir, "cuda" if cuda else "cpu"
        )
    except Exception as exc:
        progress(
            f"bench: exporting on the GPU failed ({exc.__class__.__name__}: {exc}); exporting on the CPU"
        )
        bundles["torch-cuda"] = save_torch_mlp(work / f"{MODEL}-torch-cuda-cpu-export", onnx_dir, "cpu")
    progress(f"exported the {MODEL} MLP with torch.export in {time.perf_counter() - began:.1f} s")
    return bundles


def serve_one(
    config: str, bundle: Path, work: Path, load: Load, duration_s: int, bodies: tuple[str, str], progress
) -> tuple[dict[str, str], np.ndarray, list[Measure]]:
    """One server: its provider (metadata, log), its predictions of the check rows, its measures."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = ours_env(work, f"{MODEL}-{config}", port, logging_on=False)
    if config == "torch-cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = work / f"{MODEL}-{config}.log"
    body, check_body = bodies
    with process(load.server([sys.executable, "-c", SERVE]), f"{url}/v2/health/ready", log, env) as proc:
        deploy(url, bundle)
        said, logged = provider_of(url, log)
        progress(f"{config}: provider {said} | log: {logged or '(no load line found)'}")
        target = f"{url}/v1/models/bench:predict"
        answer = httpx.post(
            target, content=check_body, headers={"content-type": "application/json"}, timeout=60
        )
        predictions = np.asarray(answer.raise_for_status().json()["predictions"], dtype=np.float64)
        measures = measure(MODEL, config, target, body, duration_s, work, load, progress, proc.pid)
    return {"metadata": said, "log": logged}, predictions, measures


def bench(duration_s: int, work: Path, load: Load, progress) -> dict[str, Any]:
    import torch

    from serving.examples import save_mlp

    features, hidden, layers = MODELS[MODEL]
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else None
    progress(f"torch {torch.__version__}, CUDA {'available: ' + gpu if cuda else 'NOT available'}")
    onnx_dir = save_mlp(work / f"{MODEL}-onnx", features=features, hidden=hidden, layers=layers, seed=1)
    bundles = export_all(onnx_dir, work, cuda, progress)
    row = [round(0.01 * i, 3) for i in range(features)]
    raw = {"onnx-cpu": raw_onnx(onnx_dir / "model.onnx", row)[1]}
    if cuda:
        try:
            raw["torch-cuda"] = raw_torch(bundles["torch-cuda"] / "data" / "model.pt2", "cuda", features)
        except Exception as exc:
            progress(
                f"bench: the exported program does not run on the GPU here: {exc.__class__.__name__}: {exc}"
            )
    progress("raw single-row call in this process: " + ", ".join(f"{k} {v:.3f} ms" for k, v in raw.items()))

    rng = np.random.default_rng(0)
    bodies = (
        json.dumps({"instances": [row]}),
        json.dumps({"instances": rng.normal(0, 1, (CHECK_ROWS, features)).round(4).tolist()}),
    )
    measures: list[Measure] = []
    providers: dict[str, dict[str, str]] = {}
    predictions: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for config in CONFIGS:
        try:
            providers[config], predictions[config], found = serve_one(
                config, bundles[config], work, load, duration_s, bodies, progress
            )
            measures += found
        except Exception as exc:  # one device run: the other configurations still count
            failed[config] = f"{exc.__class__.__name__}: {exc}"
            progress(f"bench: {config} failed: {failed[config]} (see {work / f'{MODEL}-{config}.log'})")
    reference = predictions.get("onnx-cpu")
    differences = {
        c: float(np.abs(p - reference).max()) for c, p in predictions.items() if reference is not None
    }
    return {
        "torch": str(torch.__version__),
        "gpu": gpu,
        "measures": measures,
        "providers": providers,
        "failed": failed,
        "max_abs_diff_vs_onnx": differences,
        "raw_ms": raw,
    }


def report(result: dict[str, Any]) -> str:
    measures: list[Measure] = result["measures"]
    by = {(m.server, m.concurrency): m for m in measures}
    baselines = [b for b in BASELINES if any(m.server == b for m in measures)]
    header = ["server", "provider", "c", "req/s", "p50 ms", "p99 ms", "errors"]
    header += [f"req/s vs {b}" for b in baselines] + [f"p50 vs {b}" for b in baselines]
    lines = [
        f"\n**{MODEL} MLP {MODELS[MODEL][:2]} x{MODELS[MODEL][2]} on {result['gpu'] or 'no GPU'}**"
        f" (torch {result['torch']}; raw single row in process: "
        + ", ".join(f"{k} {v:.3f} ms" for k, v in result["raw_ms"].items())
        + ")\n",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for m in measures:
        cells = [m.server, result["providers"][m.server]["metadata"], str(m.concurrency), f"{m.rps:,.0f}"]
        cells += [f"{m.p50_ms:.3f}", f"{m.p99_ms:.2f}", str(m.errors)]
        lines.append("| " + " | ".join(cells + ratios(m, by, baselines, baselines)) + " |")
    lines.append("")
    lines += compare(
        by, "torch-cuda", "torch-cpu",
        lambda c, gpu, cpu: f"- c={c}: torch-cuda serves {gpu.rps / cpu.rps:.2f}x the requests of torch-cpu"
        f" (p50 {gpu.p50_ms / cpu.p50_ms:.2f}x, p99 {gpu.p99_ms / cpu.p99_ms:.2f}x)",
    )  # fmt: skip
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in result["max_abs_diff_vs_onnx"].items())
    lines.append(f"- predictions, max abs difference to onnx-cpu over {CHECK_ROWS} rows: {diffs or 'n/a'}")
    for config, said in result["providers"].items():
        lines.append(f"- {config}: metadata says `{said['metadata']}`; log: `{said['log']}`")
    for config, error in result["failed"].items():
        lines.append(f"- **{config} FAILED**: {error}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--require-cuda", action="store_true", help="exit 3 unless torch-cuda really computed on the GPU"
    )
    add_load_options(parser)
    args = parser.parse_args()
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if (missing := missing_tools(args)) is not None:
        progress(missing)
        return 2
    load = load_from(args, progress)
    with work_dir(args.work) as work:
        result = bench(args.duration, work, load, progress)
    print(report(result))
    if args.json:
        args.json.write_text(
            json.dumps({**result, "measures": [asdict(m) for m in result["measures"]]}, indent=2)
        )
    if result["failed"]:
        return 1
    served_on = result["providers"]["torch-cuda"]["metadata"]
    if served_on != "torch:cuda":
        progress(f"bench: the torch-cuda server computed on {served_on}, not on the GPU")
        return 3 if args.require_cuda else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
