"""Baseline: a plain kserve.ModelServer with its defaults, serving the ONNX model with no extras.

No validation, no split, no batching, no metrics of ours: kserve's own V1 path around one
ONNX Runtime session (CPU provider, as every server in the benchmark). gRPC is turned off only so
that several benchmark servers do not fight over its port.
"""

from __future__ import annotations

import sys

import numpy as np


def main(model_file: str, port: int) -> None:
    sys.argv = sys.argv[:1]  # kserve parses sys.argv when imported
    import kserve
    import onnxruntime as ort

    class PlainModel(kserve.Model):
        def load(self) -> bool:
            self.session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
            self.ready = True
            return True

        def predict(self, payload, headers=None):
            x = np.asarray(payload["instances"], dtype=np.float32)
            return {"predictions": self.session.run(None, {"input": x})[0].tolist()}

    model = PlainModel("bench")
    model.load()
    kserve.ModelServer(http_port=port, enable_grpc=False).start([model])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
