"""Compute threads are sized to the CPUs the process may use, not to the machine's cores."""

from __future__ import annotations

import os

import pytest

from serving.runtime import usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    return tmp_path


@pytest.mark.parametrize(
    ("v2", "v1", "expected"),
    [
        (None, None, AFFINITY),  # no cgroup files: the affinity
        ("max 100000\n", None, AFFINITY),  # v2, no limit
        ("50000 100000\n", None, 1),  # half a CPU still gets a thread
        ("150000 100000\n", None, min(AFFINITY, 2)),  # 1.5 CPUs: 2 threads, never above the affinity
        (None, ("-1", "100000"), AFFINITY),  # v1, no limit
        (None, ("100000", "100000"), 1),
        ("garbage", ("100000", "100000"), 1),  # an unreadable v2 file: v1 decides
    ],
)
def test_threads_follow_the_affinity_and_the_cgroup_quota(tmp_path, v2, v1, expected):
    assert usable_cpus(cgroup(tmp_path, v2, v1)) == expected


def test_a_pinned_process_counts_only_its_cpus(tmp_path):
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        assert usable_cpus(tmp_path) == 1
    finally:
        os.sched_setaffinity(0, before)


def test_an_onnx_session_gets_that_many_threads(tmp_path, monkeypatch):
    import onnxruntime as ort

    from serving.examples import save_mlp
    from serving.runtime import OnnxRuntime

    seen = []
    real = ort.InferenceSession

    def spy(path, options, **kwargs):
        seen.append(options.intra_op_num_threads)
        return real(path, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    model = save_mlp(tmp_path / "m")
    monkeypatch.setattr("os.cpu_count", lambda: 64)  # a big machine, of which this process may use
    monkeypatch.setattr("serving.runtime.usable_cpus", lambda: 2)  # 2
    OnnxRuntime(model / "model.onnx", ["CPUExecutionProvider"])
    OnnxRuntime(model / "model.onnx", ["CPUExecutionProvider"], threads=3)  # the setting wins
    monkeypatch.setattr("serving.runtime.usable_cpus", lambda: 64)  # all of it: ONNX Runtime decides
    OnnxRuntime(model / "model.onnx", ["CPUExecutionProvider"])
    assert seen == [2, 3, 0]
