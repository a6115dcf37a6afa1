"""The deploy DAG's first step against a live MLflow server: a version is refused, with the reason,
unless its bytes, signature, runtime and input example check out."""

from __future__ import annotations

import numpy as np
import pytest

from serving.examples import mlp_onnx, mlp_signature
from serving.verify import SHA256_TAG
from tests.helpers import mlops_env, run_mlops
from tests.servers import mlflow_server

pytestmark = pytest.mark.integration


def register(name: str, seed: int, signature: bool = True, example: bool = True) -> str:
    import mlflow.onnx

    with mlflow.start_run():
        info = mlflow.onnx.log_model(
            mlp_onnx(16, 8, 2, seed=seed),
            name="model",
            signature=mlp_signature(16, 2, None)[0] if signature else None,
            input_example=np.full((2, 16), 0.5, np.float32) if example else None,
            registered_model_name=name,
        )
    return str(info.registered_model_version)


def model_file(client, artifacts, name: str, version: str):
    """Where the registry's store keeps a version's model file (to change its bytes behind its back)."""
    model_id = client.get_model_version(name, version).source.rsplit("/", 1)[-1]
    [path] = [p for p in artifacts.rglob("model.onnx") if model_id in str(p)]
    return path


def test_a_version_is_verified_its_bytes_recorded_and_any_change_refused(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    with mlflow_server(tmp_path / "mlflow") as registry:
        mlflow.set_tracking_uri(registry.url)
        client = MlflowClient(registry.url)
        good = register("checked", seed=1)
        unsigned = register("checked", seed=2, signature=False, example=False)
        truncated = register("checked", seed=3)
        env = mlops_env(MLOPS_STATE_DIR=str(tmp_path / "state"), MLOPS_MLFLOW__URL=registry.url)

        def verify(version: str):
            return run_mlops("deploy", "verify", "checked", "--version", version, env=env)

        first, again = verify(good), verify(good)
        tag = client.get_model_version("checked", good).tags.get(SHA256_TAG)
        changed = model_file(client, tmp_path / "mlflow" / "artifacts", "checked", good)
        changed.write_bytes(changed.read_bytes()[:-1] + b"\x00")
        tampered = verify(good)
        cut = model_file(client, tmp_path / "mlflow" / "artifacts", "checked", truncated)
        cut.write_bytes(cut.read_bytes()[:100])
        short, no_signature, missing = verify(truncated), verify(unsigned), verify("99")
        assert client.get_model_version("checked", truncated).tags.get(SHA256_TAG) is None  # nothing recorded
    assert first.code == 0, first.stderr
    assert first.json["sha256_recorded"] is True and first.json["sha256"] == tag
    assert first.json["smoke"] == "answered its input example (2 rows) with finite values"
    assert again.code == 0 and again.json["sha256_recorded"] is False
    assert tampered.code == 2 and "its bytes changed since" in tampered.json["error"]["message"]
    assert short.code == 2 and f"version {truncated} does not load" in short.json["error"]["message"]
    assert no_signature.code == 2 and "has no MLflow signature" in no_signature.json["error"]["message"]
    assert missing.code == 1 and missing.json["error"]["type"] == "ModelNotFound"
