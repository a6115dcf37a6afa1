"""A model version's signature, and every check a request's inputs go through before compute.

The signature comes from the version's MLflow signature (tensor or column specs); a model with
none falls back to what its ONNX graph declares. Decoding turns the V2 (Open Inference Protocol)
and V1 (``instances``) bodies into named numpy arrays, and fails with ``InvalidInput`` naming the
model, the field and what was expected: the request never reaches compute when it does not fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import InvalidInput

# Open Inference Protocol datatypes <-> numpy.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_V2 = {dtype: name for name, dtype in V2_TO_NUMPY.items()}
# MLflow column types (ColSpec) -> V2.
_MLFLOW_COLUMN_TO_V2 = {
    "boolean": "BOOL",
    "integer": "INT32",
    "long": "INT64",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
    "binary": "BYTES",
}
# ONNX Runtime type strings -> V2.
_ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: its V2 datatype and shape (-1 for a free dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return V2_TO_NUMPY[self.datatype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source: str  # "mlflow" or "onnx": where it was read from

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def row_features(self) -> int | None:
        """Values per row when the model takes one 2-D tensor (V1 rows may then be plain lists)."""
        if len(self.inputs) == 1 and len(self.inputs[0].shape) == 2 and self.inputs[0].shape[1] > 0:
            return self.inputs[0].shape[1]
        return None


# --- where a signature comes from ---------------------------------------------------------------


def from_mlflow(signature: Any) -> Signature:
    """From an ``mlflow.models.ModelSignature`` (tensor specs or column specs)."""
    return Signature(
        inputs=tuple(_mlflow_specs(signature.inputs)),
        outputs=tuple(_mlflow_specs(signature.outputs)) if signature.outputs is not None else (),
        source="mlflow",
    )


def _mlflow_specs(schema: Any) -> list[TensorSpec]:
    specs = []
    for index, spec in enumerate(schema.inputs):
        name = spec.name or f"input_{index}"
        if hasattr(spec, "shape"):  # TensorSpec
            datatype = NUMPY_TO_V2.get(np.dtype(spec.type))
            if datatype is None:
                raise InvalidInput(f"signature input '{name}': unsupported dtype {spec.type}")
            specs.append(TensorSpec(name, datatype, tuple(int(d) for d in spec.shape)))
        else:  # ColSpec: one value per row
            column_type = getattr(spec.type, "name", str(spec.type)).lower()
            specs.append(TensorSpec(name, _MLFLOW_COLUMN_TO_V2.get(column_type, "BYTES"), (-1,)))
    return specs


def from_onnx(inputs: Sequence[Any], outputs: Sequence[Any]) -> Signature:
    """From an ONNX Runtime session's input/output metadata (NodeArg objects)."""

    def spec(arg: Any) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
        return TensorSpec(arg.name, _ORT_TO_V2.get(arg.type, "BYTES"), shape)

    return Signature(tuple(spec(a) for a in inputs), tuple(spec(a) for a in outputs), source="onnx")


# --- requests -> named arrays -------------------------------------------------------------------


class RequestDecoder:
    """Decodes and validates request bodies for one model version."""

    def __init__(self, model: str, version: str, signature: Signature, max_batch_rows: int) -> None:
        self.model = model
        self.version = version
        self.signature = signature
        self.max_batch_rows = max_batch_rows
        # The input that V1 rows of plain values belong to (None: rows must be objects).
        self.row_input = signature.inputs[0].name if signature.row_features is not None else None
        self._where = f"model '{model}' version {version}"

    def v2(self, body: Any) -> dict[str, np.ndarray]:
        """An Open Inference Protocol request body -> named arrays, validated."""
        if not isinstance(body, Mapping):
            raise self._bad("the request body must be a JSON object")
        tensors = body.get("inputs")
        if not isinstance(tensors, list) or not tensors:
            raise self._bad("'inputs' must be a non-empty list of tensors")
        arrays: dict[str, np.ndarray] = {}
        for position, tensor in enumerate(tensors):
            if not isinstance(tensor, Mapping):
                raise self._bad(f"inputs[{position}] must be an object with name, shape, datatype, data")
            name = tensor.get("name")
            spec = self.signature.input(name) if isinstance(name, str) else None
            if spec is None:
                raise self._bad(
                    f"inputs[{position}]: '{name}' is not an input of this model; expected {self.signature.input_names}"
                )
            if name in arrays:
                raise self._bad(f"input '{name}' is given twice")
            datatype = tensor.get("datatype")
            if datatype != spec.datatype:
                raise self._bad(f"input '{name}' expected datatype {spec.datatype}, got {datatype!r}")
            shape = tensor.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise self._bad(
                    f"input '{name}': 'shape' must be a list of non-negative integers, got {shape!r}"
                )
            if "data" not in tensor:
                raise self._bad(f"input '{name}': 'data' is missing")
            arrays[name] = self._array(spec, tensor["data"], tuple(shape))
        self._complete(arrays)
        return arrays

    def v1(self, body: Any) -> dict[str, np.ndarray]:
        """A V1 ``{"instances": [...]}`` body -> named arrays, validated.

        A row is a list of values when the model takes one 2-D tensor, else an object with one
        entry per input (a named feature, or a tensor row).
        """
        if not isinstance(body, Mapping):
            raise self._bad("the request body must be a JSON object")
        rows = body.get("instances")
        if not isinstance(rows, list) or not rows:
            raise self._bad("'instances' must be a non-empty list of rows")
        self._check_rows(len(rows))
        if all(isinstance(row, list) for row in rows):
            if self.signature.row_features is None:
                raise self._bad(f"rows must be objects keyed by input name {self.signature.input_names}")
            spec, width = self.signature.inputs[0], self.signature.row_features
            wrong = next((i for i, row in enumerate(rows) if len(row) != width), None)
            if wrong is not None:
                raise self._bad(
                    f"instances[{wrong}] has {len(rows[wrong])} values; input '{spec.name}' takes {width} per row"
                )
            return {spec.name: self._array(spec, rows, (len(rows), width))}
        if not all(isinstance(row, Mapping) for row in rows):
            raise self._bad("'instances' must hold rows of one kind: all lists or all objects")
        arrays = {}
        for spec in self.signature.inputs:
            missing = next((i for i, row in enumerate(rows) if spec.name not in row), None)
            if missing is not None:
                raise self._bad(f"instances[{missing}] is missing input '{spec.name}'")
            arrays[spec.name] = self._array(spec, [row[spec.name] for row in rows], None)
        unknown = sorted({key for row in rows for key in row} - set(self.signature.input_names))
        if unknown:
            raise self._bad(f"unknown input(s) {unknown}; expected {self.signature.input_names}")
        return arrays

    # ---------------------------------------------------------------------------------------

    def _array(self, spec: TensorSpec, data: Any, shape: tuple[int, ...] | None) -> np.ndarray:
        """``data`` as an array of ``spec``'s dtype, in ``shape`` (declared by the request) or its own."""
        if shape is not None:
            self._check_shape(spec, shape)
        try:
            if spec.datatype == "BYTES":
                array = np.asarray(data, dtype=object)
                if any(not isinstance(v, str | bytes) for v in array.ravel()):
                    raise ValueError("expected strings")
            else:
                array = np.asarray(data, dtype=spec.dtype)
                if spec.dtype.kind == "f" and not np.isfinite(array).all():
                    raise ValueError("NaN or infinity is not a valid input")
        except (ValueError, TypeError, OverflowError) as exc:
            raise self._bad(f"input '{spec.name}' expected {spec.datatype} values: {exc}") from None
        if shape is None:
            self._check_shape(spec, array.shape)
            return array
        if array.size != math.prod(shape):
            raise self._bad(
                f"input '{spec.name}' has {array.size} values, shape {list(shape)} needs {math.prod(shape)}"
            )
        return array.reshape(shape)

    def _check_shape(self, spec: TensorSpec, shape: tuple[int, ...]) -> None:
        if len(shape) != len(spec.shape) or any(
            w >= 0 and w != g for w, g in zip(spec.shape, shape, strict=False)
        ):
            raise self._bad(f"input '{spec.name}' expected shape {list(spec.shape)}, got {list(shape)}")
        if shape:
            self._check_rows(shape[0])

    def _complete(self, arrays: Mapping[str, np.ndarray]) -> None:
        missing = [name for name in self.signature.input_names if name not in arrays]
        if missing:
            raise self._bad(f"missing input(s) {missing}")
        batch = {a.shape[0] for a in arrays.values() if a.ndim}
        if len(batch) > 1:
            raise self._bad(f"inputs disagree on the number of rows: {sorted(batch)}")

    def _check_rows(self, rows: int) -> None:
        if rows > self.max_batch_rows:
            raise self._bad(f"{rows} rows in one request; at most {self.max_batch_rows} are accepted")

    def _bad(self, message: str) -> InvalidInput:
        return InvalidInput(f"{self._where}: {message}")


def v2_outputs(outputs: Mapping[str, np.ndarray], signature: Signature) -> list[dict[str, Any]]:
    """Named arrays -> V2 output tensors (datatype from the signature when it has the output)."""
    declared = {spec.name: spec.datatype for spec in signature.outputs}
    encoded = []
    for name, array in outputs.items():
        datatype = declared.get(name) or NUMPY_TO_V2.get(array.dtype, "BYTES")
        encoded.append(
            {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist()}
        )
    return encoded
