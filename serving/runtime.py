"""How one model version computes: ONNX Runtime (GPU providers first, CPU last) or TorchScript.

A runtime takes named numpy arrays and returns named numpy arrays; it knows nothing of HTTP,
versions or traffic. ``run`` is synchronous and may be called from a worker thread.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from common.errors import ModelNotReady
from serving.providers import CPU_PROVIDER, usable_providers
from serving.signature import Signature, from_onnx

log = logging.getLogger(__name__)
CGROUP = Path("/sys/fs/cgroup")


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """The CPUs this process may compute on: its affinity, capped by its cgroup's CPU quota.

    ONNX Runtime and PyTorch size their thread pools by the machine's cores. In a pod limited to
    2 of 64 cores (a Kubernetes CPU limit is a cgroup quota), or in a process pinned to 2, that is
    dozens of threads that wait on each other at every operator, and that stall whenever anything
    else (the log writer, a sidecar) takes one of the 2 CPUs. ONNX Runtime's default pool also
    pins its threads to cores of its own choosing: measured on a 16-core machine, a server pinned
    to 2 CPUs computed on about 3.5 CPUs' worth of time (bench/gpu.sh).
    """
    count = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def _restricted_cpus() -> int | None:
    """``usable_cpus()`` when the process may not use the whole machine; None: let the library choose."""
    usable = usable_cpus()
    return usable if usable < (os.cpu_count() or usable) else None


def _cgroup_quota(cgroup: Path) -> float | None:
    """CPUs' worth of quota (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``); None: no limit."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


class Runtime(Protocol):
    """A loaded model file, ready to compute."""

    #: what computes: an ONNX Runtime provider name, or ``torch:cuda`` / ``torch:cpu``
    provider: str
    #: what the model file itself declares (ONNX graphs do; TorchScript does not: None)
    declared: Signature | None

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute one batch; every input has the same number of rows, every output too."""
        ...


class OnnxRuntime:
    def __init__(
        self, path: Path, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _restricted_cpus() or 0  # 0: ONNX Runtime's default
        # A server holds several sessions (stable, canary, other models): idle intra-op threads
        # that spin steal the CPU from the one that is computing, and from the event loop.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = list(providers or usable_providers())
        try:
            # enable_fallback=0: onnxruntime would print() its fallback notice; we log ours.
            self._session = ort.InferenceSession(str(path), options, providers=wanted, enable_fallback=0)
        except Exception as exc:
            if wanted == [CPU_PROVIDER]:
                raise ModelNotReady(f"ONNX Runtime cannot load '{path}': {exc}") from exc
            log.warning("%s: %s failed (%s); falling back to the CPU provider", path, wanted, exc)
            self._session = ort.InferenceSession(
                str(path), options, providers=[CPU_PROVIDER], enable_fallback=0
            )
        self.provider = self._session.get_providers()[0]
        self.declared = from_onnx(self._session.get_inputs(), self._session.get_outputs())
        self._output_names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, results, strict=True))


class TorchRuntime:
    """A PyTorch exported program (``torch.export``, MLflow's pt2) or TorchScript module.

    Outputs are named from the signature (a tensor, tuple or dict). A pickled ``nn.Module`` is
    refused: loading it would run arbitrary code from the artifact.
    """

    def __init__(
        self,
        path: Path,
        input_names: Sequence[str],
        output_names: Sequence[str],
        exported: bool,
        threads: int | None = None,
    ) -> None:
        import torch

        self._torch = torch
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        if self._device == "cpu" and (count := threads or _restricted_cpus()):
            torch.set_num_threads(count)  # process-wide: every torch version in this server
        try:
            if exported:
                self._module = torch.export.load(str(path)).module().to(self._device)
            else:
                self._module = torch.jit.load(str(path), map_location=self._device).eval()
        except RuntimeError as exc:
            kind = "an exported program" if exported else "a TorchScript module"
            raise ModelNotReady(
                f"'{path}' is not {kind} ({exc.__class__.__name__}); log the model with serialization_format='pt2'"
                " or as a scripted module"
            ) from exc
        self.provider = f"torch:{self._device}"
        self.declared = None
        self._inputs = list(input_names)
        self._outputs = list(output_names) or ["output"]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            tensors = [
                torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self._device) for name in self._inputs
            ]
            result = self._module(*tensors)
        if isinstance(result, Mapping):
            return {name: value.detach().cpu().numpy() for name, value in result.items()}
        if isinstance(result, tuple | list):
            return {
                name: value.detach().cpu().numpy() for name, value in zip(self._outputs, result, strict=False)
            }
        return {self._outputs[0]: result.detach().cpu().numpy()}
