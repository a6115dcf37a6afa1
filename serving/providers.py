"""Which ONNX Runtime execution providers this host can really use: GPU ones first, CPU last.

onnxruntime-gpu lists CUDA and TensorRT as *available* on any host, GPU or not; only a session
tells whether a provider loads (CUDA driver, cuDNN, TensorRT libraries present). So each GPU
provider is tried once on a one-node model, and the answer is cached for the process.
"""

from __future__ import annotations

import functools

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"
_FATAL_ONLY, _WARNING = 4, 2  # onnxruntime log severities (2 is its default)


@functools.cache
def usable_providers() -> tuple[str, ...]:
    """The providers a session can use on this host, in preference order, CPU always last."""
    import onnxruntime as ort

    compiled = set(ort.get_available_providers())
    usable = [p for p in GPU_PROVIDERS if p in compiled and _loads(p)]
    return (*usable, CPU_PROVIDER)


def _loads(provider: str) -> bool:
    import onnxruntime as ort

    # A provider that fails to load is an expected answer here, not an error to print; and
    # without enable_fallback=0 onnxruntime print()s its fallback notice to stdout.
    ort.set_default_logger_severity(_FATAL_ONLY)
    try:
        session = ort.InferenceSession(_identity_model(), providers=[provider], enable_fallback=0)
    except Exception:  # onnxruntime raises its own types, and plain RuntimeError, for a missing library
        return False
    finally:
        ort.set_default_logger_severity(_WARNING)
    return provider in session.get_providers()


@functools.cache
def _identity_model() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
