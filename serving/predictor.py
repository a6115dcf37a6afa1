"""`python -m serving.predictor`: one version in a KServe InferenceService pod.

Two roles, the same code as the model server's:

- predictor (default): serves the version in ``--model_dir`` (where KServe's storage initializer
  put ``storageUri``) with kserve's own endpoints; with ``--no-transformer`` it serves the bare
  tensors, for an InferenceService whose transformer component does the feature mapping;
- ``--transformer``: the InferenceService's transformer component: named raw features in, the
  tensor to the predictor (V2, at ``--predictor_host``, which KServe passes), named outputs back.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VERSION_ENV = "MLOPS_MODEL_VERSION"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.predictor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name", required=True)
    parser.add_argument("--model_dir", default="/mnt/models", type=Path)
    parser.add_argument("--http_port", type=int, default=8080)
    parser.add_argument("--host", default="0.0.0.0", help="bind address (a pod listens on all)")
    parser.add_argument("--transformer", action="store_true", help="run as the transformer component")
    parser.add_argument("--no-transformer", dest="apply_transformer", action="store_false",
                        help="predictor only: serve tensors, a transformer component maps features")  # fmt: skip
    parser.add_argument(
        "--predictor_host", help="host:port of the predictor (transformer role; KServe sets it)"
    )
    parser.add_argument("--predictor_protocol", default="v2", choices=("v1", "v2"))
    parser.add_argument("--max_request_rows", type=int, default=1024)
    parser.add_argument(
        "--indexed_tensors",
        action="store_true",
        help="transformer role: the predictor takes tensors by position, <name>__<index> (TorchScript on Triton)",
    )
    args, _ = parser.parse_known_args(argv)  # KServe may append flags of its own
    if args.transformer and not args.predictor_host:
        parser.error("--transformer needs --predictor_host")
    return args


def build_model(args: argparse.Namespace) -> Any:
    from serving.bundle import read_bundle

    bundle = read_bundle(args.model_dir)
    version = os.environ.get(VERSION_ENV, "1")
    if args.transformer:
        from serving.transformer_model import TransformerModel

        return TransformerModel(
            args.model_name, version, bundle, args.max_request_rows, indexed_tensors=args.indexed_tensors
        )
    from serving.model import VersionModel

    model = VersionModel(
        args.model_name, version, bundle, args.max_request_rows, use_transformer=args.apply_transformer
    )
    model.load()
    return model


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    sys.argv = sys.argv[:1]  # kserve parses sys.argv when imported: it gets its settings explicitly
    from serving.server import run_model_server

    predictor_config = None
    if args.transformer:
        from kserve.model import PredictorConfig

        predictor_config = PredictorConfig(
            predictor_host=args.predictor_host, predictor_protocol=args.predictor_protocol
        )
    run_model_server(args.http_port, args.host, [build_model(args)], predictor_config=predictor_config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
