"""Example model versions for demos, benchmarks and tests: MLPs built directly as ONNX graphs.

``save_mlp`` writes a real MLflow model directory (MLmodel with signature, model.onnx, and
optionally a transformer spec), the same layout a registered version has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FAULTS = ("nan", "slow")
SLOW_PRODUCTS = 120  # 1024x1024 products per row of the `slow` fault: some 8 ms on this 2-core box


def mlp_onnx(
    features: int, hidden: int, classes: int, seed: int = 0, layers: int = 1, fault: str | None = None
) -> Any:
    """An ONNX MLP: ``input`` [batch, features] float32 -> ``probabilities`` [batch, classes].

    ``fault`` makes a deliberately bad version of the same MLP, for canary tests and the demo:
    ``nan`` answers NaN for rows whose first input is above 0.8 (about a fifth of standard-normal
    rows), ``slow`` answers the same values after a few large matrix products it throws away.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    width, current = features, "input"
    for layer in range(layers):
        w = rng.normal(0, 1 / np.sqrt(width), (width, hidden)).astype(np.float32)
        b = rng.normal(0, 0.1, hidden).astype(np.float32)
        initializers += [numpy_helper.from_array(w, f"w{layer}"), numpy_helper.from_array(b, f"b{layer}")]
        nodes += [
            helper.make_node("MatMul", [current, f"w{layer}"], [f"mm{layer}"]),
            helper.make_node("Add", [f"mm{layer}", f"b{layer}"], [f"z{layer}"]),
            helper.make_node("Relu", [f"z{layer}"], [f"h{layer}"]),
        ]
        width, current = hidden, f"h{layer}"
    w_out = rng.normal(0, 1 / np.sqrt(width), (width, classes)).astype(np.float32)
    initializers.append(numpy_helper.from_array(w_out, "w_out"))
    nodes.append(helper.make_node("MatMul", [current, "w_out"], ["logits"]))
    if fault == "slow":  # logits + 0 * sum(x @ S0 @ S @ S ...): the same answer, much later
        size, products = 1024, SLOW_PRODUCTS
        initializers += [
            numpy_helper.from_array(rng.normal(0, 1e-3, (features, size)).astype(np.float32), "s0"),
            numpy_helper.from_array(rng.normal(0, 1e-3, (size, size)).astype(np.float32), "s"),
            numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
        ]
        nodes.append(helper.make_node("MatMul", ["input", "s0"], ["slow0"]))
        for i in range(1, products):  # one matrix, used again: a small file, a long compute
            nodes.append(helper.make_node("MatMul", [f"slow{i - 1}", "s"], [f"slow{i}"]))
        nodes += [
            helper.make_node("ReduceSum", [f"slow{products - 1}"], ["slow_sum"], keepdims=1),
            helper.make_node("Mul", ["slow_sum", "zero"], ["nothing"]),
            helper.make_node("Add", ["logits", "nothing"], ["logits_out"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["logits"], ["logits_out"]))
    softmax = "probabilities_ok" if fault == "nan" else "probabilities"
    nodes.append(helper.make_node("Softmax", ["logits_out"], [softmax], axis=1))
    if fault == "nan":  # where input[:, 0] > 0.8: NaN
        initializers += [
            numpy_helper.from_array(np.array([0], np.int64), "first_start"),
            numpy_helper.from_array(np.array([1], np.int64), "first_end"),
            numpy_helper.from_array(np.array([1], np.int64), "first_axis"),
            numpy_helper.from_array(np.array([0.8], np.float32), "cut"),
            numpy_helper.from_array(np.array([np.nan], np.float32), "nan"),
        ]
        nodes += [
            helper.make_node("Slice", ["input", "first_start", "first_end", "first_axis"], ["first"]),
            helper.make_node("Greater", ["first", "cut"], ["faulty"]),
            helper.make_node("Where", ["faulty", "nan", "probabilities_ok"], ["probabilities"]),
        ]
    elif fault not in (None, "slow"):
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def mlp_signature(features: int, classes: int, transformer: dict[str, Any] | None) -> tuple[Any, int]:
    """The MLflow signature of an example MLP, and the width of its input tensor.

    With a transformer the signature names the raw features (column specs); without, it is the
    tensor ``input`` [-1, features].
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    if transformer is not None:
        specs = transformer["features"]
        inputs = Schema([ColSpec("double" if f["type"] == "numeric" else "string", f["name"]) for f in specs])
        features = sum(len(f["categories"]) if f["type"] == "categorical" else 1 for f in specs)
    else:
        inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, features), "input")])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, classes), "probabilities")])
    return ModelSignature(inputs, outputs), features


def save_mlp(
    path: Path,
    features: int = 16,
    hidden: int = 32,
    classes: int = 2,
    seed: int = 0,
    layers: int = 1,
    transformer: dict[str, Any] | None = None,
) -> Path:
    """An MLflow model directory holding an MLP (and a transformer spec when given)."""
    import mlflow.onnx

    from serving.transformer import METADATA_KEY

    signature, width = mlp_signature(features, classes, transformer)
    mlflow.onnx.save_model(
        mlp_onnx(width, hidden, classes, seed, layers),
        str(path),
        signature=signature,
        metadata={METADATA_KEY: transformer} if transformer else None,
    )
    return Path(path)


def log_mlp(
    registered_model_name: str,
    seed: int,
    transformer: dict[str, Any] | None = None,
    fault: str | None = None,
    input_example: Any | None = None,
) -> str:
    """Log an example MLP to the current MLflow run and register it; returns the new version."""
    import mlflow.onnx

    from serving.transformer import METADATA_KEY

    signature, width = mlp_signature(16, 2, transformer)
    info = mlflow.onnx.log_model(
        mlp_onnx(width, 32, 2, seed, fault=fault),
        name="model",
        signature=signature,
        input_example=input_example,
        registered_model_name=registered_model_name,
        metadata={METADATA_KEY: transformer} if transformer else None,
    )
    return str(info.registered_model_version)


def fraud_transformer() -> dict[str, Any]:
    """A transformer spec over named raw features: two numeric, one categorical, two labels."""
    return {
        "version": 1,
        "input": "input",
        "features": [
            {"name": "amount", "type": "numeric", "mean": 50.0, "scale": 25.0},
            {"name": "age_days", "type": "numeric", "mean": 400.0, "scale": 300.0},
            {"name": "country", "type": "categorical", "categories": ["DE", "FR", "US"]},
        ],
        "output": {"name": "probabilities", "labels": ["legit", "fraud"]},
    }


# --- other frameworks (served converted to ONNX: serving/frameworks.py) -----------------------

FRAMEWORKS = ("sklearn", "xgboost", "lightgbm")
PACKAGES = {"sklearn": "scikit-learn", "xgboost": "xgboost", "lightgbm": "lightgbm"}
IRIS_COLUMNS = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def iris() -> tuple[Any, Any]:
    """scikit-learn's iris data (shipped with it, never downloaded): named columns, species labels."""
    from sklearn.datasets import load_iris

    data = load_iris(as_frame=True)
    frame = data.frame.drop(columns="target")
    frame.columns = list(IRIS_COLUMNS)
    return frame, data.target_names[data.target]


def framework_model(framework: str, seed: int = 0) -> Any:
    """One fitted iris classifier of ``framework``: a scikit-learn pipeline (scaling, logistic
    regression), an XGBClassifier, or a LightGBM booster (its own API)."""
    features, labels = iris()
    if framework == "sklearn":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, random_state=seed)).fit(
            features, labels
        )
    codes = np.unique(labels, return_inverse=True)[1]
    if framework == "xgboost":
        import xgboost

        return xgboost.XGBClassifier(n_estimators=20, max_depth=3, random_state=seed).fit(features, codes)
    if framework == "lightgbm":
        import lightgbm

        params = {"objective": "multiclass", "num_class": 3, "verbose": -1, "seed": seed}
        return lightgbm.train(params, lightgbm.Dataset(features, codes), num_boost_round=20)
    raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")


def save_framework_model(framework: str, path: Path, model: Any | None = None, **options: Any) -> Path:
    """An MLflow model directory of ``framework``'s own flavor, with a signature and an input
    example (what the parity check runs on); scikit-learn's in skops, MLflow's default."""
    import importlib

    flavor = importlib.import_module(f"mlflow.{framework}")
    model = model if model is not None else framework_model(framework)
    # Named, not inferred: inferring runs the model in a subprocess, seconds each.
    options.setdefault("pip_requirements", [PACKAGES[framework]])
    flavor.save_model(model, str(path), input_example=iris()[0].iloc[:5], **options)
    return Path(path)


def log_framework_model(framework: str, registered_model_name: str) -> str:
    """Log ``framework``'s iris example to the current MLflow run and register it; the new version."""
    import importlib

    flavor = importlib.import_module(f"mlflow.{framework}")
    info = flavor.log_model(
        framework_model(framework), name="model", input_example=iris()[0].iloc[:5],
        registered_model_name=registered_model_name, pip_requirements=[PACKAGES[framework]],
    )  # fmt: skip
    return str(info.registered_model_version)
