"""A version's own pre/post-processing: named raw features in, named outputs back.

The spec travels with the model version (in its MLmodel file, under ``metadata.mlops_transformer``),
so a new version brings its own feature order, scaling, category encoding and label mapping, and
applications keep sending raw, named features. It is pure numpy: it runs in the model server's
process here and in the KServe predictor on Kubernetes alike.

Spec (version 1)::

    {"version": 1,
     "input": "input",                       # the model tensor the features become
     "features": [
        {"name": "amount", "type": "numeric", "mean": 52.1, "scale": 31.4},
        {"name": "country", "type": "categorical", "categories": ["DE", "FR", "US"]}],
     "output": {"name": "probabilities", "labels": ["legit", "fraud"]}}

Numeric features are standardised ((x - mean) / scale); categorical ones are one-hot encoded in
the listed order, and a category the version has not seen encodes to all zeros (and is counted,
so monitoring can see it). With ``labels``, the output tensor holds one score per label and the
response adds the best label.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import InvalidInput
from serving.signature import Signature, TensorSpec

METADATA_KEY = "mlops_transformer"


@dataclass(frozen=True)
class Feature:
    name: str
    type: str  # numeric | categorical
    mean: float = 0.0
    scale: float = 1.0
    categories: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return len(self.categories) if self.type == "categorical" else 1


@dataclass(frozen=True)
class Transformer:
    input: str
    features: tuple[Feature, ...]
    output: str
    labels: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Transformer:
        if spec.get("version") != 1:
            raise InvalidInput(f"transformer spec version {spec.get('version')!r} is not supported (1 is)")
        features = []
        for raw in spec.get("features", []):
            kind = raw.get("type")
            if kind == "numeric":
                scale = float(raw.get("scale", 1.0))
                if scale == 0:
                    raise InvalidInput(f"transformer feature '{raw.get('name')}': scale must not be 0")
                features.append(Feature(raw["name"], kind, float(raw.get("mean", 0.0)), scale))
            elif kind == "categorical":
                features.append(
                    Feature(raw["name"], kind, categories=tuple(str(c) for c in raw["categories"]))
                )
            else:
                raise InvalidInput(
                    f"transformer feature '{raw.get('name')}': type {kind!r} is not numeric or categorical"
                )
        if not features:
            raise InvalidInput("transformer spec has no features")
        output = spec.get("output", {})
        return cls(
            input=spec["input"],
            features=tuple(features),
            output=output.get("name", ""),
            labels=tuple(str(label) for label in output.get("labels", ())),
        )

    def request_signature(self, model_signature: Signature) -> Signature:
        """What applications send and get: one 1-D input per raw feature; the named outputs."""
        inputs = tuple(
            TensorSpec(f.name, "FP64" if f.type == "numeric" else "BYTES", (-1,)) for f in self.features
        )
        outputs: tuple[TensorSpec, ...] = (TensorSpec(self.output, "FP32", (-1, len(self.labels) or -1)),)
        if self.labels:
            outputs = (TensorSpec("label", "BYTES", (-1,)), *outputs)
        return Signature(inputs, outputs, source=model_signature.source)

    def encode(self, features: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Raw feature columns -> the model's input tensor; also how many unknown categories were seen."""
        rows = len(next(iter(features.values())))
        matrix = np.zeros((rows, sum(f.width for f in self.features)), dtype=np.float32)
        unknown = 0
        column = 0
        for feature in self.features:
            values = features[feature.name]
            if feature.type == "numeric":
                with np.errstate(over="ignore"):  # a value beyond FP32 becomes inf: refused below
                    matrix[:, column] = (values.astype(np.float64) - feature.mean) / feature.scale
            else:
                index = {c: i for i, c in enumerate(feature.categories)}
                for row, value in enumerate(values):
                    position = index.get(value.decode() if isinstance(value, bytes) else str(value))
                    if position is None:
                        unknown += 1
                    else:
                        matrix[row, column + position] = 1.0
            column += feature.width
        if not np.isfinite(matrix).all():  # one check a batch; finding the feature only when it fails
            raise self._overflow(features, matrix)
        return {self.input: matrix}, unknown

    def _overflow(self, features: Mapping[str, np.ndarray], matrix: np.ndarray) -> InvalidInput:
        """A numeric feature whose value, standardised, does not fit the model's FP32 tensor."""
        column = 0
        for feature in self.features:
            if feature.type == "numeric" and not np.isfinite(matrix[:, column]).all():
                row = int(np.flatnonzero(~np.isfinite(matrix[:, column]))[0])
                value = features[feature.name][row]
                return InvalidInput(
                    f"input '{feature.name}' value {value!r} is out of the range the model computes in (FP32)"
                )
            column += feature.width
        return InvalidInput("an input is out of the range the model computes in (FP32)")

    def decode(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's output tensor -> named outputs (scores, and the best label when labelled)."""
        scores = outputs[self.output] if self.output in outputs else next(iter(outputs.values()))
        named = {self.output: scores}
        if self.labels:
            if scores.ndim != 2 or scores.shape[1] != len(self.labels):
                raise InvalidInput(
                    f"model output '{self.output}' has shape {list(scores.shape)}; the transformer maps "
                    f"{len(self.labels)} labels"
                )
            named = {"label": np.asarray(self.labels, dtype=object)[scores.argmax(axis=1)], **named}
        return named

    def v1_predictions(self, named: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        scores = named[self.output]
        if not self.labels:
            return [{self.output: row.tolist()} for row in scores]
        return [
            {"label": label, self.output: dict(zip(self.labels, row.tolist(), strict=True))}
            for label, row in zip(named["label"], scores, strict=True)
        ]
