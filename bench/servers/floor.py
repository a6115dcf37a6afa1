"""The floor: a bare ASGI app (Starlette + uvicorn + orjson) around the same ONNX Runtime session.

No validation, no routing, no metrics, no logging: what a server costs at the least, per request.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def app_for(model_file: str) -> Starlette:
    session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])

    async def predict(request: Request) -> Response:
        body = orjson.loads(await request.body())
        x = np.asarray(body["instances"], dtype=np.float32)
        y = session.run(None, {"input": x})[0]
        return Response(
            orjson.dumps({"predictions": y}, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
        )

    async def health(request: Request) -> Response:
        return Response("ok")

    return Starlette(
        routes=[Route("/v1/models/{name}:predict", predict, methods=["POST"]), Route("/health", health)]
    )


if __name__ == "__main__":
    uvicorn.run(
        app_for(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False
    )
