"""Versions of other frameworks (MLflow's ``sklearn``, ``xgboost`` and ``lightgbm`` flavors), served
on the same ONNX Runtime path as ONNX versions, GPU included: converted to ONNX once, when first
loaded, and checked against the native model on the version's input example.

No artifact is unpickled: pickle runs code when loaded. A scikit-learn model (and LightGBM's
scikit-learn classes) must be logged with ``serialization_format="skops"``, and is loaded with
skops' check of the types it holds (estimators of scikit-learn, XGBoost and LightGBM, numpy and
scipy types; anything else is refused, named). XGBoost's JSON/UBJ files and LightGBM's text model
are data. The converted graph takes the version's numeric columns as one FP32 tensor; a generated
transformer spec (serving/transformer.py) names them and maps a classifier's probabilities to its
classes, so a converted version answers as an ONNX version with a transformer spec does.

What cannot be converted (an estimator the converters do not know, a custom class, a column that
is not numeric) is refused at load with what it is and what is supported, never at request time.
Converted graphs are cached by the version's sha256, so a version converts and is checked once.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InvalidInput

FLAVORS = ("sklearn", "xgboost", "lightgbm")
PARITY_ATOL = 1e-4  # |ONNX - native| at most this (probabilities, or predictions) on the example
CACHE = Path(tempfile.gettempdir()) / f"mlops-converted-{os.getuid()}"
CONVERSION = 1  # part of the cache key: a change to what a conversion makes converts again
SUPPORTED = (
    "scikit-learn estimators and pipelines that skl2onnx converts (logged with serialization_format='skops'),"
    " XGBClassifier and XGBRegressor (JSON or UBJ), LightGBM boosters and LGBMClassifier/LGBMRegressor"
)
# Modules whose types a skops file may hold (skops refuses any other type unless trusted).
_TRUSTED_MODULES = ("sklearn.", "numpy.", "scipy.", "xgboost.", "lightgbm.", "builtins.", "collections.")
_ONNX_OPSET = {"": 15, "ai.onnx.ml": 3}


@dataclass(frozen=True)
class Converted:
    model_file: Path  # the ONNX graph
    spec: dict[str, Any]  # the generated transformer spec
    parity: dict[str, Any]  # the check's figures


def convert(
    folder: Path, flavor: str, conf: dict[str, Any], columns: list[tuple[str, str]], sha256: str
) -> Converted:
    """The version in ``folder`` (MLmodel flavor ``flavor``, its ``conf``) as ONNX; ``columns`` are
    its signature's (name, type) inputs. Cached by ``sha256``; InvalidInput names a refusal."""
    cache = _private(CACHE)
    key = f"{sha256}-{CONVERSION}"
    graph, record = cache / f"{key}.onnx", cache / f"{key}.json"
    if graph.is_file() and record.is_file():
        saved = json.loads(record.read_text())
        return Converted(graph, saved["spec"], saved["parity"])
    where = f"'{folder}' ({flavor})"
    model = _load_native(folder, flavor, conf, where)  # first: a pickle is refused before anything else
    text = [name for name, kind in columns if kind not in ("double", "float", "long", "integer", "boolean")]
    if not columns or text:
        raise InvalidInput(
            f"{where}: only numeric input columns are converted, and its signature has"
            f" {text or 'no column inputs'}; encode them in the pipeline, or log the model as ONNX"
        )
    names = [name for name, _ in columns]
    onnx_model, labels = _to_onnx(model, len(names), where)
    example = _example(folder, names, where)
    parity = _parity(model, onnx_model, labels, example, where)
    spec = {
        "version": 1,
        "input": "input",
        "features": [{"name": name, "type": "numeric"} for name in names],
        "output": {"name": "probabilities", "labels": labels}
        if labels is not None
        else {"name": "prediction"},
    }
    staged = graph.with_suffix(f".{os.getpid()}.tmp")
    staged.write_bytes(onnx_model.SerializeToString())
    staged.replace(graph)
    record.write_text(json.dumps({"spec": spec, "parity": parity, "flavor": flavor}))
    return Converted(graph, spec, parity)


def _private(folder: Path) -> Path:
    """The cache folder, made private to this user: what is read from it is served, so nobody else
    may have put it there (a shared temporary folder otherwise lets them)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    state = folder.stat()
    if state.st_uid != os.getuid() or state.st_mode & 0o077:
        raise InvalidInput(f"the conversion cache '{folder}' is not private to this user; remove it")
    return folder


def _load_native(folder: Path, flavor: str, conf: dict[str, Any], where: str) -> Any:
    from serving.sources import inside

    if flavor == "xgboost":
        import xgboost

        kind = str(conf.get("model_class", "xgboost.core.Booster")).rsplit(".", 1)[-1]
        classes = {"XGBClassifier": xgboost.XGBClassifier, "XGBRegressor": xgboost.XGBRegressor}
        if kind not in classes:
            raise InvalidInput(f"{where}: XGBoost's {kind} is not converted; supported: {SUPPORTED}")
        model = classes[kind]()
        model.load_model(str(inside(folder, str(conf.get("data", "model.ubj")), f"{where}: data")))
        model.get_booster().feature_names = None  # the converter addresses features by position
        return model
    if flavor == "lightgbm" and str(conf.get("model_class", "")).endswith(".Booster"):
        import lightgbm

        return lightgbm.Booster(
            model_file=str(inside(folder, str(conf.get("data", "model.lgb")), f"{where}: data"))
        )
    # scikit-learn's flavor, and LightGBM's scikit-learn classes: skops, or refused.
    key = "pickled_model" if flavor == "sklearn" else "data"
    path = inside(folder, str(conf.get(key, "model.skops")), f"{where}: {key}")
    if conf.get("serialization_format") != "skops":
        raise InvalidInput(
            f"{where}: '{path.name}' is a {conf.get('serialization_format', 'pickle')} file, and loading a pickle"
            " runs code from the artifact; log the model with serialization_format='skops'"
        )
    import skops.io

    untrusted = skops.io.get_untrusted_types(file=str(path))
    foreign = [name for name in untrusted if not name.startswith(_TRUSTED_MODULES)]
    if foreign:
        raise InvalidInput(
            f"{where}: holds types that are not safe to load: {foreign}; supported: {SUPPORTED}"
        )
    return skops.io.load(str(path), trusted=untrusted)


def _to_onnx(model: Any, width: int, where: str) -> tuple[Any, list[str] | None]:
    """The ONNX graph (input ``input`` [N, width] FP32; output ``probabilities`` [N, classes] of a
    classifier, else ``prediction``) and a classifier's labels (None for a regressor)."""
    labels = _labels(model)
    try:
        if _lightgbm_booster(model):
            from onnxmltools import convert_lightgbm
            from onnxmltools.convert.common.data_types import FloatTensorType

            graph = convert_lightgbm(
                model, initial_types=[("input", FloatTensorType([None, width]))], zipmap=False,
                target_opset=_ONNX_OPSET[""],
            )  # fmt: skip
        else:
            from skl2onnx import to_onnx
            from skl2onnx.common.data_types import FloatTensorType

            _register_boosters()
            options = {id(step): {"zipmap": False} for step in _classifiers(model)}
            graph = to_onnx(
                model, initial_types=[("input", FloatTensorType([None, width]))], options=options,
                target_opset=_ONNX_OPSET,
            )  # fmt: skip
    except Exception as exc:  # the converters raise their own types for what they do not know
        said = (str(exc).strip().splitlines() or [""])[0]  # the converters add a page of advice
        raise InvalidInput(
            f"{where}: {type(model).__name__} cannot be converted to ONNX ({type(exc).__name__}: {said});"
            f" supported: {SUPPORTED}"
        ) from exc
    outputs = [output.name for output in graph.graph.output]
    wanted = outputs[1] if labels is not None else outputs[0]  # classifiers: label, then scores
    _keep_output(graph, wanted, "probabilities" if labels is not None else "prediction")
    return graph, labels


def _labels(model: Any) -> list[str] | None:
    """A classifier's class names in its score columns' order; None for a regressor."""
    if _lightgbm_booster(model):  # LightGBM's own API: the objective says
        objective = str(model.dump_model().get("objective", ""))
        if objective.startswith(("binary", "multiclass", "multiclassova")):
            classes = max(2, model.num_model_per_iteration())
            return [str(i) for i in range(classes)]
        return None
    classes = getattr(model, "classes_", None)
    return [str(c) for c in classes] if classes is not None else None


def _lightgbm_booster(model: Any) -> bool:
    """LightGBM's own model (its text file), not one of its scikit-learn classes."""
    return type(model).__name__ == "Booster" and type(model).__module__.startswith("lightgbm")


def _classifiers(model: Any) -> list[Any]:
    steps = [step for _, step in getattr(model, "steps", [])] or [model]
    return [step for step in steps if hasattr(step, "classes_")]


@functools.cache
def _register_boosters() -> None:
    """Teach skl2onnx XGBoost's and LightGBM's scikit-learn classes (onnxmltools converts them)."""
    import lightgbm
    import xgboost
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    classifier = {"nocl": [True, False], "zipmap": [True, False, "columns"]}
    for kind, name, shapes, converter, options in (
        (xgboost.XGBClassifier, "XGBoostXGBClassifier", calculate_linear_classifier_output_shapes, convert_xgboost, classifier),
        (xgboost.XGBRegressor, "XGBoostXGBRegressor", calculate_linear_regressor_output_shapes, convert_xgboost, None),
        (lightgbm.LGBMClassifier, "LightGbmLGBMClassifier", calculate_linear_classifier_output_shapes, convert_lightgbm, classifier),
        (lightgbm.LGBMRegressor, "LightGbmLGBMRegressor", calculate_linear_regressor_output_shapes, convert_lightgbm, None),
    ):  # fmt: skip
        update_registered_converter(kind, name, shapes, converter, options=options)


def _keep_output(graph: Any, name: str, rename: str) -> None:
    """Leave the graph one output, ``name``, renamed ``rename``."""
    for output in list(graph.graph.output):
        if output.name != name:
            graph.graph.output.remove(output)
    for node in graph.graph.node:
        node.input[:] = [rename if value == name else value for value in node.input]
        node.output[:] = [rename if value == name else value for value in node.output]
    graph.graph.output[0].name = rename


def _example(folder: Path, names: list[str], where: str) -> np.ndarray:
    """The version's input example as rows of its columns, or a row of zeros when it has none."""
    from serving.bundle import input_example

    rows = input_example(folder, where) or []
    if rows and all(isinstance(row, dict) and set(names) <= row.keys() for row in rows):
        return np.asarray([[row[n] for n in names] for row in rows], np.float32)
    return np.zeros((1, len(names)), np.float32)


def _parity(model: Any, graph: Any, labels: list[str] | None, rows: np.ndarray, where: str) -> dict[str, Any]:
    """ONNX Runtime against the native model on ``rows``: the largest difference, or InvalidInput."""
    import onnxruntime

    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    converted = session.run(None, {"input": rows})[0].astype(np.float64)
    if _lightgbm_booster(model):
        native = np.asarray(model.predict(rows), np.float64)
        if labels is not None and native.ndim == 1:  # a binary booster: the positive class
            native = np.column_stack([1 - native, native])
    elif labels is not None:
        native = np.asarray(model.predict_proba(rows), np.float64)
    else:
        native = np.asarray(model.predict(rows), np.float64)
    native = native.reshape(converted.shape)
    worst = float(np.max(np.abs(converted - native))) if native.size else 0.0
    if not worst <= PARITY_ATOL:
        raise InvalidInput(
            f"{where}: the ONNX conversion answers its input example up to {worst:.3g} away from the native"
            f" model (tolerance {PARITY_ATOL:g}); refused"
        )
    return {"rows": int(len(rows)), "max_abs_diff": worst, "atol": PARITY_ATOL}
