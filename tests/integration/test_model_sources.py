"""The model server loads versions from the MLflow registry and from S3 (moto's server over HTTP)."""

from __future__ import annotations

import os

import httpx
import pytest

from serving.examples import mlp_onnx
from tests.servers import Admin, mlflow_server, model_server, moto_server

pytestmark = pytest.mark.integration

ROW = [0.3] * 16


def predict(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{model}:predict", json={"instances": [ROW]}, timeout=30)


def test_a_version_from_the_mlflow_registry(tmp_path):
    import mlflow
    import mlflow.onnx
    import numpy as np
    from mlflow.models import infer_signature

    with mlflow_server(tmp_path / "mlflow") as registry:
        mlflow.set_tracking_uri(registry.url)
        example = np.asarray([ROW], dtype=np.float32)
        signature = infer_signature({"input": example}, {"probabilities": np.zeros((1, 2), np.float32)})
        with mlflow.start_run():
            info = mlflow.onnx.log_model(mlp_onnx(16, 8, 2, seed=5), name="model", signature=signature,
                                         registered_model_name="registry-model")  # fmt: skip
        version = str(info.registered_model_version)
        with model_server(tmp_path / "serving", MLOPS_MLFLOW__URL=registry.url) as server:
            status = Admin(server.url).load(
                "registry-model", version, f"models:/registry-model/{version}", role="stable"
            )
            answer = predict(server.url, "registry-model")
            missing = Admin(server.url).http.post(
                "/registry-model/versions", json={"version": "99", "uri": "models:/registry-model/99"}
            )
    assert status["stable"]["uri"] == f"models:/registry-model/{version}"
    assert status["stable"]["signature"] == "mlflow"
    assert answer.status_code == 200 and answer.headers["x-model-version"] == version
    assert missing.status_code == 404, missing.text
    assert "models:/registry-model/99" in missing.json()["error"]


def test_a_version_from_s3(tmp_path, monkeypatch):
    import boto3

    from serving.examples import save_mlp

    local = save_mlp(tmp_path / "local", seed=6)
    with moto_server(tmp_path) as s3:
        credentials = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        for key, value in {**credentials, "AWS_ENDPOINT_URL": s3.url}.items():
            monkeypatch.setenv(key, value)
        client = boto3.client("s3", endpoint_url=s3.url)
        client.create_bucket(Bucket="models")
        for path in local.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), "models", f"fraud/6/{path.relative_to(local)}")
        assert os.environ["AWS_ENDPOINT_URL"] == s3.url
        with model_server(tmp_path / "serving") as server:
            status = Admin(server.url).load("s3-model", "6", "s3://models/fraud/6", role="stable")
            answer = predict(server.url, "s3-model")
            empty = Admin(server.url).http.post(
                "/s3-model/versions", json={"version": "7", "uri": "s3://models/fraud/7"}
            )
    assert status["stable"]["uri"] == "s3://models/fraud/6"
    assert answer.status_code == 200 and answer.headers["x-model-version"] == "6"
    assert empty.status_code == 404 and "no objects under that prefix" in empty.json()["error"]
