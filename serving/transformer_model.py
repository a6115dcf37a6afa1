"""The transformer component of a KServe InferenceService: raw features in, named outputs out.

It maps a request's named raw features to the version's model tensor (the version's own
transformer spec), sends that to the predictor over V2, and maps the answer back to labels and
scores. Same spec, same decoder as the model server, where the mapping runs in-process instead.
"""

from __future__ import annotations

from typing import Any

import kserve
import numpy as np
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse

from common.errors import ModelNotReady
from serving.bundle import Bundle
from serving.model import kserve_errors
from serving.signature import RequestDecoder, v2_outputs
from serving.targets.triton import indexed, unindexed

# How postprocess knows which protocol the request came in: kserve hands the same headers dict
# to preprocess and postprocess of one request.
_PROTOCOL_HEADER = "x-mlops-protocol"


class TransformerModel(kserve.Model):
    def __init__(
        self,
        name: str,
        version: str,
        bundle: Bundle,
        max_request_rows: int = 1024,
        indexed_tensors: bool = False,
    ) -> None:
        super().__init__(name)
        # The predictor takes and gives tensors by position, ``<name>__<index>`` (TorchScript on Triton).
        self.indexed_tensors = indexed_tensors
        if bundle.transformer is None:
            raise ModelNotReady(f"model '{name}' version {version} has no transformer spec to run")
        if bundle.signature is None:
            raise ModelNotReady(f"model '{name}' version {version} needs an MLflow signature")
        self.version = version
        self.transformer = bundle.transformer
        self.signature = bundle.transformer.request_signature(bundle.signature)
        self.decoder = RequestDecoder(name, version, self.signature, max_request_rows)
        self.ready = True

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> InferRequest:
        with kserve_errors(self.name):
            return self._to_tensors(payload, headers)

    def _to_tensors(self, payload: Any, headers: dict[str, str] | None) -> InferRequest:
        if isinstance(payload, InferRequest):
            body = {
                "inputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "data": t.data}
                    for t in payload.inputs
                ]
            }
            inputs, protocol = self.decoder.v2(body), "v2"
        else:
            inputs, protocol = self.decoder.v1(payload), "v1"
        if headers is not None:
            headers[_PROTOCOL_HEADER] = protocol
        feeds, _ = self.transformer.encode(inputs)
        tensors = []
        for index, (name, array) in enumerate(feeds.items()):
            tensor = InferInput(
                indexed(name, index) if self.indexed_tensors else name, list(array.shape), "FP32"
            )
            tensor.set_data_from_numpy(array.astype(np.float32), binary_data=False)
            tensors.append(tensor)
        return InferRequest(self.name, tensors, request_id=(headers or {}).get("x-request-id"))

    async def postprocess(
        self, result: Any, headers: dict[str, str] | None = None, response_headers: Any = None
    ) -> Any:
        response = result if isinstance(result, InferResponse) else InferResponse.from_rest(result)
        named = self.transformer.decode(
            {unindexed(o.name) if self.indexed_tensors else o.name: o.as_numpy() for o in response.outputs}
        )
        if (headers or {}).get(_PROTOCOL_HEADER, "v1") == "v1":
            return {"predictions": self.transformer.v1_predictions(named)}
        return InferResponse(
            response_id=response.id,
            model_name=self.name,
            model_version=self.version,
            infer_outputs=[
                InferOutput(o["name"], o["shape"], o["datatype"], o["data"])
                for o in v2_outputs(named, self.signature)
            ],
        )

    def get_input_types(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec in self.signature.inputs]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec in self.signature.outputs]
