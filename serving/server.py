"""The model server process: kserve's ModelServer, with this project's front and deployments.

It starts with no model (the stack brings it up before any version is approved), restores the
versions its state file names, and binds to the configured host (kserve's own REST server always
binds 0.0.0.0). gRPC is off: the V2 REST API is the contract here.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from mlops.settings import Settings


def serve(settings: Settings) -> None:
    # kserve parses sys.argv when imported: a flag of ours with the same name would silently change
    # its defaults. Everything it needs is passed explicitly below.
    sys.argv = sys.argv[:1]
    from kserve import ModelServer
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    from serving.auth import admin_token
    from serving.deployments import Deployments
    from serving.http import Front

    log = logging.getLogger("serving")
    token = admin_token(settings)

    class _RESTServer(RESTServer):
        def create_application(self) -> None:
            super().create_application()
            from kserve.model_server import app

            self.config.app = Front(app, deployments, token, settings.serving.max_body_bytes)
            self.config.host = settings.host
            # Per-request log lines cost more than a small model's inference: metrics count requests.
            access = logging.getLogger("uvicorn.access")
            access.handlers, access.propagate = [], False
            logging.getLogger("kserve.trace").setLevel(logging.WARNING)

    class _ModelServer(ModelServer):
        def start(self, models: list | None = None) -> None:  # type: ignore[override]
            rest = _RESTServer(
                FASTAPI_APP_IMPORT_STRING,
                self.dataplane,
                self.model_repository_extension,
                self.http_port,
                grace_period=self.grace_period,
                timeout_keep_alive=self.timeout_keep_alive,
            )
            self.setup_event_loop()
            self.register_signal_handler()

            async def main() -> None:
                restoring = asyncio.get_running_loop().create_task(deployments.restore())
                await rest.start()
                restoring.cancel()

            asyncio.run(main())

    server = _ModelServer(
        http_port=settings.serving.port,
        enable_grpc=False,
        enable_latency_logging=False,
        workers=1,
        grace_period=10,
    )
    deployments = Deployments(settings, server.registered_models)
    log.info("model server on %s:%s, state %s", settings.host, settings.serving.port, deployments.state_file)
    server.start()


def main() -> int:
    from mlops.errors import MLOpsError
    from mlops.settings import load_settings

    try:
        settings = load_settings()
    except MLOpsError as exc:
        print(f"serving: error: {exc}", file=sys.stderr)
        return exc.exit_code
    serve(settings)
    return 0
