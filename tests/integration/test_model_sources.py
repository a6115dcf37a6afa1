"""The model server loads versions from the MLflow registry and from S3 (moto's server over HTTP)."""

from __future__ import annotations

import os

import httpx
import numpy as np
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


def test_an_alias_is_loaded_as_the_version_it_names_now_not_the_one_it_named(tmp_path):
    import mlflow
    import mlflow.onnx
    from mlflow import MlflowClient

    with mlflow_server(tmp_path / "mlflow") as registry:
        mlflow.set_tracking_uri(registry.url)
        versions = []
        for seed in (7, 8):
            with mlflow.start_run():
                info = mlflow.onnx.log_model(
                    mlp_onnx(16, 8, 2, seed=seed), name="model", registered_model_name="aliased"
                )
            versions.append(str(info.registered_model_version))
        client = MlflowClient(registry.url)
        client.set_registered_model_alias("aliased", "champion", versions[0])
        with model_server(tmp_path / "serving", MLOPS_MLFLOW__URL=registry.url) as server:
            admin = Admin(server.url)
            first = admin.load("aliased", versions[0], "models:/aliased@champion", role="stable")
            client.set_registered_model_alias("aliased", "champion", versions[1])
            moved = admin.load("aliased", versions[1], "models:/aliased@champion", role="stable")
            wrong = admin.http.post(
                "/aliased/versions", json={"version": versions[0], "uri": "models:/aliased@champion"}
            )
            missing = admin.http.post(
                "/aliased/versions", json={"version": "1", "uri": "models:/aliased@nope"}
            )
    assert first["stable"]["uri"] == f"models:/aliased/{versions[0]}"
    assert moved["stable"]["uri"] == f"models:/aliased/{versions[1]}"
    assert (
        moved["stable"]["sha256"] != first["stable"]["sha256"]
    )  # the other version's bytes, not the cached ones
    assert wrong.status_code == 400 and f"names version {versions[1]} now" in wrong.json()["error"]
    assert missing.status_code == 404 and "no alias 'nope'" in missing.json()["error"]


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


@pytest.fixture
def s3(tmp_path, monkeypatch):
    import boto3

    with moto_server(tmp_path) as server:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": server.url,
        }.items():
            monkeypatch.setenv(key, value)
        client = boto3.client("s3", endpoint_url=server.url)
        client.create_bucket(Bucket="models")
        yield client


def upload(client, folder, prefix: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "models", f"{prefix}/{path.relative_to(folder)}")


def test_a_prefix_fetches_its_own_folder_not_its_namesakes(tmp_path, s3):
    from serving.examples import save_mlp
    from serving.sources import fetch

    upload(s3, save_mlp(tmp_path / "one", seed=1), "fraud/1")
    upload(s3, save_mlp(tmp_path / "ten", seed=10), "fraud/10")
    s3.put_object(Bucket="models", Key="fraud/10/extra.txt", Body=b"not version 1's")
    got = fetch("s3://models/fraud/1", tmp_path / "cache", "http://127.0.0.1:1")
    assert (got / "MLmodel").is_file() and not (got / "extra.txt").exists()
    assert sorted(p.name for p in got.iterdir()) == sorted(
        [".complete", *(p.name for p in (tmp_path / "one").iterdir())]
    )


@pytest.mark.parametrize("key", ["fraud/2/../../escaped.txt", "fraud/2//etc/escaped.txt"])
def test_an_object_key_that_leads_out_of_the_download_folder_is_refused(tmp_path, s3, key):
    from common.errors import InvalidInput
    from serving.examples import save_mlp
    from serving.sources import fetch

    upload(s3, save_mlp(tmp_path / "two", seed=2), "fraud/2")
    s3.put_object(Bucket="models", Key=key, Body=b"written anywhere")
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(InvalidInput, match="points outside"):
        fetch("s3://models/fraud/2", cache, "http://127.0.0.1:1")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_concurrent_loads_of_one_uri_fetch_it_once_and_all_get_it_whole(tmp_path, s3, monkeypatch):
    import threading

    from serving import sources
    from serving.examples import save_mlp

    upload(s3, save_mlp(tmp_path / "three", seed=3), "fraud/3")
    calls = []
    real = sources._from_s3

    def counted(*args):
        calls.append(args)
        real(*args)

    monkeypatch.setattr(sources, "_from_s3", counted)
    results, errors = [], []

    def load() -> None:
        try:
            results.append(sources.fetch("s3://models/fraud/3", tmp_path / "cache", "http://127.0.0.1:1"))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(results) == 6 and len(set(results)) == 1
    assert len(calls) == 1
    assert (results[0] / "MLmodel").is_file() and (results[0] / ".complete").is_file()


def test_a_version_of_each_framework_registered_in_mlflow_is_served_and_verified(tmp_path):
    """scikit-learn, XGBoost and LightGBM versions, logged with MLflow's own flavors: `mlops deploy
    verify` passes each (the conversion and its parity check included) and the model server
    answers each over HTTP as its native model does; a pickled one is refused at load with 400."""
    import mlflow

    from serving.examples import FRAMEWORKS, framework_model, iris, log_framework_model
    from tests.helpers import mlops_env, run_mlops

    features, _ = iris()
    rows = features.iloc[[0, 60, 120]]
    with mlflow_server(tmp_path / "mlflow") as registry:
        mlflow.set_tracking_uri(registry.url)
        versions = {}
        for framework in FRAMEWORKS:
            with mlflow.start_run():
                versions[framework] = log_framework_model(framework, f"iris-{framework}")
        with mlflow.start_run():
            pickled = mlflow.sklearn.log_model(
                framework_model("sklearn"), name="model", serialization_format="cloudpickle",
                registered_model_name="iris-pickled", pip_requirements=["scikit-learn"],
            ).registered_model_version  # fmt: skip
        env = mlops_env(MLOPS_MLFLOW__URL=registry.url, MLOPS_STATE_DIR=str(tmp_path / "cli"))
        verified = {
            f: run_mlops("deploy", "verify", f"iris-{f}", "--version", v, env=env)
            for f, v in versions.items()
        }
        with model_server(tmp_path / "serving", MLOPS_MLFLOW__URL=registry.url) as server:
            admin = Admin(server.url)
            answers = {}
            for framework, version in versions.items():
                model = f"iris-{framework}"
                admin.load(model, version, f"models:/{model}/{version}", role="stable")
                answers[framework] = httpx.post(
                    f"{server.url}/v1/models/{model}:predict",
                    json={"instances": rows.to_dict(orient="records")}, timeout=30,
                )  # fmt: skip
            refused = admin.http.post(
                "/iris-pickled/versions",
                json={"version": str(pickled), "uri": f"models:/iris-pickled/{pickled}"},
            )
    for run in verified.values():
        assert run.code == 0, run.stderr[-2000:]
        assert run.json["flavor"] == "onnx" and "answered its input example (5 rows)" in run.json["smoke"]
        assert run.json["parity"]["rows"] == 5 and run.json["parity"]["max_abs_diff"] <= 1e-4
    assert {f: run.json["converted_from"] for f, run in verified.items()} == {f: f for f in FRAMEWORKS}
    for framework, answer in answers.items():
        assert answer.status_code == 200, answer.text
        native = framework_model(framework)
        scores = native.predict(rows) if framework == "lightgbm" else native.predict_proba(rows)
        got = [list(p["probabilities"].values()) for p in answer.json()["predictions"]]
        np.testing.assert_allclose(got, scores, atol=1e-4)
    assert refused.status_code == 400 and "serialization_format='skops'" in refused.json()["error"]


def test_a_model_on_triton_gets_its_version_published_next_to_it_once(tmp_path, s3):
    import uuid

    from serving.examples import save_mlp
    from serving.policy import Policy
    from serving.targets.kserve import KServeTarget, to_manifest
    from tests.unit.serving.test_kserve_target import SETTINGS, FakeCluster

    folder = save_mlp(tmp_path / "five", seed=5)
    prefix = f"fraud/{uuid.uuid4().hex[:8]}/5"  # the target's download cache is keyed by URI
    upload(s3, folder, prefix)
    cluster = FakeCluster()
    kserve = KServeTarget(
        "ml", SETTINGS, client=cluster.client, policy=lambda model: Policy(model, runtime="triton")
    )
    kserve.deploy("fraud", "5", f"s3://models/{prefix}", role="stable")
    repository = f"{prefix}-triton-fraud"
    model = to_manifest(cluster.objects["fraud"])["spec"]["predictor"]["model"]
    assert model["storageUri"] == f"s3://models/{repository}" and model["runtime"] == "kserve-tritonserver"
    listed = s3.list_objects_v2(Bucket="models", Prefix=f"{repository}/")["Contents"]
    assert sorted(o["Key"] for o in listed) == [
        f"{repository}/fraud/1/model.onnx",
        f"{repository}/fraud/config.pbtxt",
    ]
    onnx_bytes = s3.get_object(Bucket="models", Key=f"{repository}/fraud/1/model.onnx")["Body"].read()
    assert onnx_bytes == (folder / "model.onnx").read_bytes()
    config = s3.get_object(Bucket="models", Key=f"{repository}/fraud/config.pbtxt")["Body"].read().decode()
    assert 'name: "fraud"' in config and "max_batch_size: 256" in config
    # Published once: the next step finds the config and writes nothing (not even a file it lost).
    s3.delete_object(Bucket="models", Key=f"{repository}/fraud/1/model.onnx")
    kserve.deploy("fraud", "5", f"s3://models/{prefix}", role="stable")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="models", Prefix=f"{repository}/")["Contents"]]
    assert keys == [f"{repository}/fraud/config.pbtxt"]


def test_a_torchscript_version_on_triton_goes_by_position_also_when_published_before(tmp_path, s3):
    import uuid

    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from serving.policy import Policy
    from serving.targets.kserve import KServeTarget, to_manifest
    from tests.unit.serving.test_kserve_target import SETTINGS, FakeCluster

    signature = ModelSignature(
        Schema([TensorSpec(np.dtype(np.float32), (-1, 4), "features")]),
        Schema([TensorSpec(np.dtype(np.float32), (-1, 4), "scores")]),
    )
    folder = tmp_path / "scripted"
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Softmax(dim=1)))
    mlflow.pytorch.save_model(module, str(folder), signature=signature, serialization_format="pickle")
    prefix = f"scorer/{uuid.uuid4().hex[:8]}/1"
    upload(s3, folder, prefix)
    cluster = FakeCluster()
    kserve = KServeTarget(
        "ml", SETTINGS, client=cluster.client, policy=lambda model: Policy(model, runtime="triton")
    )
    for _ in range(2):  # the second time the repository is there: read back, not written
        kserve.deploy("scorer", "1", f"s3://models/{prefix}", role="stable")
        model = to_manifest(cluster.objects["scorer"])["spec"]["predictor"]["model"]
        assert model["modelFormat"] == {"name": "pytorch"} and model["runtime"] == "kserve-tritonserver"
    repository = f"{prefix}-triton-scorer"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="models", Prefix=f"{repository}/")["Contents"])
    assert keys == [f"{repository}/scorer/1/model.pt", f"{repository}/scorer/config.pbtxt"]
    config = s3.get_object(Bucket="models", Key=f"{repository}/scorer/config.pbtxt")["Body"].read().decode()
    assert 'platform: "pytorch_libtorch"' in config and '"features__0"' in config and '"scores__0"' in config
