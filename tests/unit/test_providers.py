from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from common.errors import MLOpsError
from mlops.doctor import doctor
from serving.providers import CPU_PROVIDER, GPU_PROVIDERS, _identity_model, usable_providers

NO_GPU = not torch.cuda.is_available()


def test_cpu_is_always_usable_and_last():
    assert usable_providers()[-1] == CPU_PROVIDER


@pytest.mark.skipif(not NO_GPU, reason="this host has a GPU")
def test_gpu_providers_that_are_compiled_in_but_cannot_load_are_not_offered():
    # onnxruntime-gpu lists CUDA even on a host without a GPU; we must not believe it.
    assert "CUDAExecutionProvider" in ort.get_available_providers()
    assert usable_providers() == (CPU_PROVIDER,)


def test_every_offered_provider_really_runs_a_session():
    offered = usable_providers()
    assert offered and offered[-1] == CPU_PROVIDER  # the loop runs on every host: the CPU at least
    for provider in offered:
        session = ort.InferenceSession(_identity_model(), providers=[provider], enable_fallback=0)
        assert session.get_providers()[0] == provider


def test_each_gpu_provider_compiled_in_is_probed_once_per_process(monkeypatch):
    from serving import providers

    probed: list[str] = []
    monkeypatch.setattr(providers, "_loads", lambda provider: probed.append(provider) or False)
    providers.usable_providers.cache_clear()
    try:
        assert usable_providers() == usable_providers() == (CPU_PROVIDER,)
    finally:
        providers.usable_providers.cache_clear()
    compiled = [p for p in GPU_PROVIDERS if p in ort.get_available_providers()]
    assert compiled and probed == compiled  # onnxruntime-gpu compiles them in: each tried, once


@pytest.mark.skipif(not NO_GPU, reason="this host has a GPU")
def test_doctor_fails_when_a_gpu_is_required_and_there_is_none():
    with pytest.raises(MLOpsError, match="a GPU is required but none is usable"):
        doctor(mlflow_url=None, require_gpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA device")
def test_cuda_provider_is_offered_first_on_a_gpu_host():
    assert usable_providers()[0] in GPU_PROVIDERS
