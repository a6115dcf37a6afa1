"""The InferenceService pods' code path, run here as processes: kserve's own server with our model
class, and the transformer component in front of a bare-tensor predictor (over V2 HTTP)."""

from __future__ import annotations

import sys

import httpx
import pytest

from serving.examples import fraud_transformer, save_mlp
from tests.conftest import free_port
from tests.helpers import mlops_env
from tests.servers import start

pytestmark = pytest.mark.integration

RAW = [{"amount": 42.0, "age_days": 10, "country": "US"}, {"amount": 3.5, "age_days": 900, "country": "DE"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_mlp(tmp_path_factory.mktemp("pod") / "model", seed=11, transformer=fraud_transformer())


def pod(args: list[str], tmp, name: str, version: str = "5"):
    port = free_port()
    argv = [sys.executable, "-m", "serving.predictor", "--host", "127.0.0.1", "--http_port", str(port), *args]
    return start(argv, mlops_env(MLOPS_MODEL_VERSION=version), tmp / f"{name}.log", port, "/v2/health/ready")


def test_predictor_pod_serves_raw_features_with_kserves_own_endpoints(model_dir, tmp_path):
    server = pod(["--model_name", "fraud", "--model_dir", str(model_dir)], tmp_path, "predictor")
    try:
        v1 = httpx.post(f"{server.url}/v1/models/fraud:predict", json={"instances": RAW}, timeout=30)
        bad = httpx.post(
            f"{server.url}/v1/models/fraud:predict", json={"instances": [{"amount": 1}]}, timeout=30
        )
        metadata = httpx.get(f"{server.url}/v2/models/fraud", timeout=30).json()
    finally:
        server.stop()
    assert v1.status_code == 200, v1.text
    assert [p["label"] in ("legit", "fraud") for p in v1.json()["predictions"]] == [True, True]
    assert bad.status_code == 400 and "missing input 'age_days'" in bad.text
    assert [i["name"] for i in metadata["inputs"]] == ["amount", "age_days", "country"]


def test_transformer_component_maps_features_for_a_tensor_predictor(model_dir, tmp_path):
    predictor = pod(
        ["--model_name", "fraud", "--model_dir", str(model_dir), "--no-transformer"], tmp_path, "predictor"
    )
    transformer = None
    try:
        tensor = httpx.get(f"{predictor.url}/v2/models/fraud", timeout=30).json()
        transformer = pod(
            ["--transformer", "--model_name", "fraud", "--model_dir", str(model_dir),
             "--predictor_host", f"127.0.0.1:{predictor.port}"],
            tmp_path, "transformer",
        )  # fmt: skip
        through = httpx.post(
            f"{transformer.url}/v1/models/fraud:predict", json={"instances": RAW}, timeout=30
        )
        v2_inputs = [
            {"name": "amount", "datatype": "FP64", "shape": [2], "data": [42.0, 3.5]},
            {"name": "age_days", "datatype": "FP64", "shape": [2], "data": [10.0, 900.0]},
            {"name": "country", "datatype": "BYTES", "shape": [2], "data": ["US", "DE"]},
        ]
        through_v2 = httpx.post(
            f"{transformer.url}/v2/models/fraud/infer", json={"inputs": v2_inputs}, timeout=30
        )
    finally:
        for server in (transformer, predictor):
            if server is not None:
                server.stop()
    assert tensor["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 5]}]
    assert through.status_code == 200, through.text
    predictions = through.json()["predictions"]
    assert [set(p["probabilities"]) for p in predictions] == [{"legit", "fraud"}] * 2
    assert through_v2.status_code == 200, through_v2.text
    body = through_v2.json()
    assert body["model_version"] == "5"
    assert [o["name"] for o in body["outputs"]] == ["label", "probabilities"]
    assert body["outputs"][0]["data"] == [p["label"] for p in predictions]
