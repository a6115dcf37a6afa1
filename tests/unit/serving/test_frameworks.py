"""Versions of scikit-learn, XGBoost and LightGBM, saved with MLflow's own flavors, served as their
ONNX conversion: checked against the native model once, answering as the native model does;
what cannot be served safely or at all is refused at load, named."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from common.errors import InvalidInput
from serving import frameworks
from serving.bundle import read_bundle
from serving.examples import FRAMEWORKS, framework_model, iris, save_framework_model
from serving.model import VersionModel

warnings.filterwarnings("ignore", module="mlflow")
ROWS = [
    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3},
    {"sepal_length": 5.9, "sepal_width": 2.8, "petal_length": 4.3, "petal_width": 1.3},
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(frameworks, "CACHE", tmp_path / "converted")


def native_scores(framework: str, model, rows: np.ndarray) -> np.ndarray:
    return model.predict(rows) if framework == "lightgbm" else model.predict_proba(rows)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_version_of_each_framework_answers_as_its_native_model(framework, tmp_path):
    model = framework_model(framework)
    bundle = read_bundle(save_framework_model(framework, tmp_path / framework, model))
    assert (bundle.flavor, bundle.converted_from) == ("onnx", framework)
    assert bundle.parity["rows"] == 5 and bundle.parity["max_abs_diff"] <= frameworks.PARITY_ATOL
    served = VersionModel("iris", "1", bundle)
    served.load()
    answer = served.compute(served.decoder.v1({"instances": ROWS}))
    rows = np.asarray([list(row.values()) for row in ROWS], np.float32)
    expected = native_scores(framework, model, rows)
    np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-4)
    labels = [str(c) for c in (model.classes_ if framework == "sklearn" else range(3))]
    assert list(answer["label"]) == [labels[i] for i in expected.argmax(axis=1)]
    # What an application gets: the same V1 answer as an ONNX version with a transformer spec.
    [first, *_] = served.transformer.v1_predictions(answer)
    assert set(first) == {"label", "probabilities"} and set(first["probabilities"]) == set(labels)


def test_a_version_converts_and_is_checked_once(tmp_path, monkeypatch):
    folder = save_framework_model("xgboost", tmp_path / "xgb")
    first = read_bundle(folder)
    monkeypatch.setattr(frameworks, "_to_onnx", lambda *a: pytest.fail("converted a second time"))
    again = read_bundle(folder)
    assert again.model_file == first.model_file and again.parity == first.parity
    assert read_bundle(folder, convert=False).flavor == "xgboost"  # what the KServe target asks


def test_a_pickle_is_refused_before_it_is_opened(tmp_path):
    folder = save_framework_model("sklearn", tmp_path / "pickled", serialization_format="cloudpickle")
    with pytest.raises(
        InvalidInput, match="loading a pickle runs code from the artifact.*serialization_format='skops'"
    ):
        read_bundle(folder)


def test_an_estimator_the_converters_do_not_know_is_refused_naming_it(tmp_path):
    from sklearn.kernel_ridge import KernelRidge

    features, labels = iris()
    model = KernelRidge().fit(features, np.unique(labels, return_inverse=True)[1])
    folder = save_framework_model("sklearn", tmp_path / "ridge", model)
    with pytest.raises(
        InvalidInput, match="KernelRidge cannot be converted to ONNX.*supported: scikit-learn"
    ):
        read_bundle(folder)


def test_a_conversion_that_disagrees_with_the_native_model_is_refused_with_the_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(frameworks, "PARITY_ATOL", 1e-12)
    folder = save_framework_model("sklearn", tmp_path / "strict")
    with pytest.raises(InvalidInput, match=r"up to [0-9.e-]+ away from the native model \(tolerance 1e-12\)"):
        read_bundle(folder)


def test_a_column_that_is_not_numeric_is_refused_naming_it(tmp_path):
    import mlflow.sklearn
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    features, labels = iris()
    features = features.assign(garden=np.where(features["sepal_length"] > 5.8, "north", "south"))
    encode = make_column_transformer((OneHotEncoder(), ["garden"]), remainder="passthrough")
    model = make_pipeline(encode, LogisticRegression(max_iter=500)).fit(features, labels)
    mlflow.sklearn.save_model(
        model, str(tmp_path / "mixed"), input_example=features.iloc[:3], pip_requirements=[]
    )
    with pytest.raises(InvalidInput, match=r"only numeric input columns are converted.*\['garden'\]"):
        read_bundle(tmp_path / "mixed")
