"""One model version as a ``kserve.Model``: load, preprocess, predict, postprocess, explain.

The same class serves in two places: in this project's model server (whose fast path calls
``decoder`` and ``compute`` directly, with batching and the canary split around them), and as
the predictor of a KServe InferenceService on Kubernetes, where kserve's own server calls the
standard handlers below.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import kserve
import numpy as np
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from common.errors import InvalidInput, ModelNotReady
from serving import metrics
from serving.bundle import Bundle
from serving.runtime import OnnxRuntime, Runtime, TorchRuntime
from serving.signature import RequestDecoder, Signature, v2_outputs


@contextlib.contextmanager
def kserve_errors(model: str) -> Iterator[None]:
    """Our errors as kserve's, so kserve's own server answers 400/503 instead of 500."""
    try:
        yield
    except InvalidInput as exc:
        raise kserve.errors.InvalidInput(str(exc)) from exc
    except ModelNotReady as exc:
        raise kserve.errors.ModelNotReady(model, str(exc)) from exc


@dataclass(frozen=True)
class Decoded:
    """Validated inputs and how the request came (for the response's shape)."""

    inputs: dict[str, np.ndarray]
    protocol: str  # v1 | v2
    request_id: str


class VersionModel(kserve.Model):
    def __init__(
        self,
        name: str,
        version: str,
        bundle: Bundle,
        max_batch_rows: int = 1024,
        threads: int | None = None,
        providers: list[str] | None = None,
        use_transformer: bool = True,
    ) -> None:
        super().__init__(name)
        self.version = str(version)
        self.bundle = bundle
        self.max_batch_rows = max_batch_rows
        self._threads = threads
        self._providers = providers
        self.runtime: Runtime | None = None
        self.model_signature: Signature | None = None
        self.request_signature: Signature | None = None
        self.decoder: RequestDecoder | None = None
        self.unknown_categories = 0  # raw categories the transformer had never seen
        # Off in a predictor pod whose InferenceService has a transformer component.
        self.transformer = bundle.transformer if use_transformer else None

    # --- loading ------------------------------------------------------------------------------

    def load(self) -> bool:
        bundle = self.bundle
        # With a transformer spec the MLflow signature describes the raw features a request sends;
        # the model tensor is the graph's own (or the spec's ``input``).
        if bundle.flavor == "onnx":
            self.runtime = OnnxRuntime(bundle.model_file, self._providers, self._threads)
        else:
            if bundle.signature is None:
                raise ModelNotReady(
                    f"model '{self.name}' version {self.version}: a PyTorch model needs an MLflow signature"
                )
            inputs = (
                [bundle.transformer.input]
                if bundle.transformer
                else [s.name for s in bundle.signature.inputs]
            )
            self.runtime = TorchRuntime(
                bundle.model_file,
                inputs,
                [s.name for s in bundle.signature.outputs],
                exported=bundle.flavor == "torch_export",
                threads=self._threads,
            )
        declared = self.runtime.declared
        signature = (declared or bundle.signature) if bundle.transformer else (bundle.signature or declared)
        if signature is None:
            raise ModelNotReady(
                f"model '{self.name}' version {self.version}: no signature to validate requests with"
            )
        self.model_signature = signature
        self.request_signature = (
            self.transformer.request_signature(signature) if self.transformer else signature
        )
        if self.transformer is not None and bundle.signature is not None:
            declared_features = set(bundle.signature.input_names)
            features = {f.name for f in self.transformer.features}
            if declared_features != features:
                raise ModelNotReady(
                    f"model '{self.name}' version {self.version}: MLflow signature inputs"
                    f" {sorted(declared_features)} do not match the transformer's features {sorted(features)}"
                )
        self.decoder = RequestDecoder(self.name, self.version, self.request_signature, self.max_batch_rows)
        self._smoke_test()
        self.ready = True
        return True

    def _zero_row(self) -> dict[str, np.ndarray]:
        """One request row of zeros (or empty strings), as the request signature has it."""
        assert self.request_signature is not None
        row = {}
        for spec in self.request_signature.inputs:
            shape = tuple(1 if d < 0 else d for d in spec.shape)
            row[spec.name] = (
                np.full(shape, "", dtype=object) if spec.datatype == "BYTES" else np.zeros(shape, spec.dtype)
            )
        return row

    def tensors(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The model's own tensors for one row of zeros: what its runtime takes (after the
        transformer, if any) and what it answers, named, typed and shaped (a loaded version)."""
        assert self.runtime is not None
        row = self._zero_row()
        feeds = self.transformer.encode(row)[0] if self.transformer is not None else row
        return feeds, self.runtime.run(feeds)

    def _smoke_test(self) -> None:
        """One row of zeros (or empty strings) through the whole path: a broken model fails at load."""
        row = self._zero_row()
        try:
            self.compute(row)
        except Exception as exc:
            raise ModelNotReady(
                f"model '{self.name}' version {self.version} fails on a smoke input: {exc}"
            ) from exc
        self.unknown_categories = 0  # the smoke row's empty categories are not traffic

    @property
    def provider(self) -> str:
        return self.runtime.provider if self.runtime is not None else "not loaded"

    # --- the protocol-free core (the fast path calls these) -------------------------------------

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validated inputs (raw features when the version has a transformer) -> named outputs."""
        runtime = self.runtime
        if runtime is None:
            raise ModelNotReady(f"model '{self.name}' version {self.version} is not loaded")
        transformer = self.transformer
        if transformer is None:
            return self._finite(runtime.run(inputs))
        try:
            feeds, unknown = transformer.encode(inputs)
        except InvalidInput as exc:
            metrics.NONFINITE.labels(self.name, self.version).inc()
            raise InvalidInput(f"model '{self.name}' version {self.version}: {exc}") from None
        if unknown:
            self.unknown_categories += unknown
            metrics.UNKNOWN_CATEGORIES.labels(self.name, self.version).inc(unknown)
        return transformer.decode(self._finite(runtime.run(feeds)))

    def _finite(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs, if every float in them is finite: a NaN or an infinity is never an answer
        (JSON would carry it as null). One check per output and batch; the batcher retries a batch
        that fails a request at a time, so only the request that caused it gets the error."""
        for name, array in outputs.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                metrics.NONFINITE.labels(self.name, self.version).inc()
                rows = sorted({int(r) for r in np.argwhere(~np.isfinite(array))[:, 0]})
                raise InvalidInput(
                    f"model '{self.name}' version {self.version}: output '{name}' is not finite for input"
                    f" row(s) {rows[:10]}: the input is out of the range the model computes in"
                )
        return outputs

    def v1_predictions(self, outputs: Mapping[str, np.ndarray]) -> list[Any]:
        if self.transformer is not None:
            return self.transformer.v1_predictions(outputs)
        if len(outputs) == 1:
            return next(iter(outputs.values())).tolist()
        rows = len(next(iter(outputs.values())))
        return [{name: value[i].tolist() for name, value in outputs.items()} for i in range(rows)]

    def v2_body(self, outputs: Mapping[str, np.ndarray], request_id: str) -> dict[str, Any]:
        assert self.request_signature is not None
        return {
            "model_name": self.name,
            "model_version": self.version,
            "id": request_id,
            "outputs": v2_outputs(outputs, self.request_signature),
        }

    # --- kserve's handlers (used when kserve's own server runs this model) ----------------------

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Decoded:
        with kserve_errors(self.name):
            return self._decode(payload, headers)

    def _decode(self, payload: Any, headers: dict[str, str] | None) -> Decoded:
        decoder = self._decoder()
        request_id = (headers or {}).get("x-request-id") or uuid.uuid4().hex
        if isinstance(payload, InferRequest):
            body = {
                "inputs": [
                    {
                        "name": tensor.name,
                        "datatype": tensor.datatype,
                        "shape": list(tensor.shape),
                        "data": tensor.data if tensor.data is not None else tensor.as_numpy(),
                    }
                    for tensor in payload.inputs
                ]
            }
            return Decoded(decoder.v2(body), "v2", payload.id or request_id)
        return Decoded(decoder.v1(payload), "v1", request_id)

    def predict(
        self, payload: Decoded, headers: dict[str, str] | None = None
    ) -> tuple[Decoded, dict[str, np.ndarray]]:
        return payload, self.compute(payload.inputs)

    async def postprocess(self, result: Any, headers: dict[str, str] | None = None) -> Any:
        if not isinstance(result, tuple):  # an explanation: already the response body
            return result
        decoded, outputs = result
        if decoded.protocol == "v1":
            return {"predictions": self.v1_predictions(outputs)}
        body = self.v2_body(outputs, decoded.request_id)
        return InferResponse(
            response_id=body["id"],
            model_name=self.name,
            model_version=self.version,
            infer_outputs=[
                InferOutput(o["name"], o["shape"], o["datatype"], o["data"]) for o in body["outputs"]
            ],
        )

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """kserve's ``:explain``: the same attributions as the model server's (serving/explain.py)."""
        from serving.explain import explain

        decoded: Decoded = payload
        with kserve_errors(self.name):
            return {**explain(self.compute, decoded.inputs, self.transformer), "model_version": self.version}

    def get_input_types(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec in (self.request_signature.inputs if self.request_signature else ())]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec in (self.request_signature.outputs if self.request_signature else ())]

    def _decoder(self) -> RequestDecoder:
        if self.decoder is None:
            raise ModelNotReady(f"model '{self.name}' version {self.version} is not loaded")
        return self.decoder
