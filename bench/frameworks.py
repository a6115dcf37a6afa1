"""Other frameworks served as their ONNX conversion (serving/frameworks.py): what the conversion
costs once, and what serving the conversion gains, against the native model in the same run.

For each of scikit-learn, XGBoost and LightGBM (the iris examples of serving/examples.py):
- the first load of a version (the native model read, converted, checked on its input example)
  and a later one (the cached conversion), each as a ratio to reading the native model alone;
- rows/s of the converted graph in a bare ONNX Runtime session (what the conversion gains), and of
  the model server's own path (`VersionModel.compute`: validation, the generated transformer, ONNX
  Runtime, metrics), each against the native model's `predict_proba` on the same rows, one row
  per call and 256 per call.

    .venv/bin/python -m bench.frameworks [--seconds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def rate(call, rows: int, seconds: float) -> float:
    """Rows per second of ``call`` (``rows`` each), timed for about ``seconds``."""
    call()  # warm
    done, begun = 0, time.perf_counter()
    while time.perf_counter() - begun < seconds:
        call()
        done += rows
    return done / (time.perf_counter() - begun)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import onnxruntime

    from serving import frameworks
    from serving.bundle import read_bundle
    from serving.examples import FRAMEWORKS, framework_model, iris, save_framework_model
    from serving.model import VersionModel

    features, _ = iris()
    print(f"{'framework':<10} {'first load':>11} {'cached':>8} {'ONNX, 1 row':>12} {'served, 1 row':>14}"
          f" {'ONNX, 256':>10} {'served, 256':>12}")  # fmt: skip
    print(f"{'':<10} {'x native read':>11} {'':>8} {'x native predict':>12}")
    with tempfile.TemporaryDirectory() as folder:
        frameworks.CACHE = Path(folder) / "converted"
        for framework in FRAMEWORKS:
            model = framework_model(framework)
            path = save_framework_model(framework, Path(folder) / framework, model)
            native_read = _native_read(framework, path)
            begun = time.perf_counter()
            bundle = read_bundle(path)
            first = time.perf_counter() - begun
            begun = time.perf_counter()
            read_bundle(path)
            cached = time.perf_counter() - begun
            served = VersionModel("iris", "1", bundle)
            served.load()
            session = onnxruntime.InferenceSession(str(bundle.model_file), providers=["CPUExecutionProvider"])
            ratios, natives = [], []
            for rows in (1, 256):
                frame = features.sample(rows, replace=True, random_state=0)
                values = frame.to_numpy(np.float32)
                predict = model.predict if framework == "lightgbm" else model.predict_proba
                native = rate(lambda v=values, p=predict: p(v), rows, args.seconds)
                bare = rate(lambda v=values, s=session: s.run(None, {"input": v}), rows, args.seconds)
                decoded = served.decoder.v1({"instances": frame.to_dict(orient="records")})
                ours = rate(lambda d=decoded, s=served: s.compute(d), rows, args.seconds)
                ratios += [bare / native, ours / native]
                natives.append(native)
            print(
                f"{framework:<10} {first / native_read:>10.1f}x {cached / native_read:>7.2f}x"
                + "".join(f" {r:>11.2f}x" for r in ratios)
                + f"   (native read {native_read * 1000:.1f} ms, first {first * 1000:.0f} ms, cached"
                f" {cached * 1000:.1f} ms; native {natives[0]:,.0f} and {natives[1]:,.0f} rows/s)"
            )


def _native_read(framework: str, path: Path) -> float:
    """Seconds to read the version's native model, as the conversion does (after a warm-up)."""
    import yaml

    from serving.bundle import read_bundle
    from serving.frameworks import _load_native

    conf = yaml.safe_load((path / "MLmodel").read_text())["flavors"][framework]
    read_bundle(path, convert=False)
    _load_native(path, framework, conf, str(path))  # imports
    begun = time.perf_counter()
    _load_native(path, framework, conf, str(path))
    return time.perf_counter() - begun


if __name__ == "__main__":
    main()
