"""Model server processes: kserve's ModelServer, bound where we say, with our front when wanted.

Two processes use it: the model server of the stack (``python -m serving``: this project's front,
deployments restored from the state file, no model at start), and the pods of a KServe
InferenceService (``python -m serving.predictor``: one version, kserve's own endpoints). kserve's
REST server always binds 0.0.0.0; here the host is a setting (loopback in the embedded stack).
gRPC is off: the V2 REST API is the contract.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from common.settings import Settings

ASGIApp = Any


def run_model_server(
    port: int,
    host: str,
    models: list[Any] | None = None,
    wrap: Callable[[ASGIApp], ASGIApp] | None = None,
    predictor_config: Any | None = None,
    on_start: Callable[[Any], Awaitable[None]] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. ``on_start(model_repository)`` runs as a task once the loop runs;
    ``on_stop()`` once the server has stopped answering (to drain what it buffered)."""
    # kserve parses sys.argv when imported: a flag of ours with the same name would silently change
    # its defaults. Everything it needs is passed explicitly below.
    sys.argv = sys.argv[:1]
    from kserve import ModelServer
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    class _RESTServer(RESTServer):
        def create_application(self) -> None:
            super().create_application()
            from kserve.model_server import app

            self.config.app = wrap(app) if wrap is not None else app
            self.config.host = host
            # Per-request log lines cost more than a small model's inference: metrics count requests.
            access = logging.getLogger("uvicorn.access")
            access.handlers, access.propagate = [], False
            logging.getLogger("kserve.trace").setLevel(logging.WARNING)

    class _ModelServer(ModelServer):
        def start(self, models: list[Any] | None = None) -> None:  # type: ignore[override]
            for model in models or []:
                self.register_model(model)
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
                started = None
                if on_start is not None:
                    started = asyncio.get_running_loop().create_task(on_start(self.registered_models))
                try:
                    await rest.start()
                finally:
                    if started is not None:
                        started.cancel()
                    if on_stop is not None:
                        on_stop()

            asyncio.run(main())

    server = _ModelServer(
        http_port=port,
        enable_grpc=False,
        enable_latency_logging=False,
        workers=1,
        grace_period=10,
        predictor_config=predictor_config,
    )
    server.start(models)


def serve(settings: Settings) -> None:
    """The stack's model server: the fast front, deployments restored from the state file."""
    from serving.auth import admin_token, feedback_token
    from serving.deployments import Deployments
    from serving.http import Front

    token = admin_token(settings)
    holder: dict[str, Any] = {}
    logger, labels = inference_log(settings) if settings.logs.enabled else (None, None)

    def wrap(app: ASGIApp) -> ASGIApp:
        return Front(
            app,
            holder["deployments"],
            token,
            settings.serving.max_body_bytes,
            logger,
            feedback_token=feedback_token(settings),
            labels=labels,
            shadow_max_pending=settings.serving.shadow_max_pending,
            canary_fallback=settings.serving.canary_fallback,
        )

    async def on_start(repository: Any) -> None:
        deployments = holder["deployments"]
        deployments.attach(repository)
        await deployments.restore()
        holder["lease_watch"] = asyncio.get_running_loop().create_task(deployments.watch_leases())

    holder["deployments"] = Deployments(settings)
    logging.getLogger("serving").info(
        "model server on %s:%s, state %s",
        settings.host,
        settings.serving.port,
        holder["deployments"].state_file,
    )
    run_model_server(
        settings.serving.port,
        settings.host,
        wrap=wrap,
        on_start=on_start,
        on_stop=logger.close if logger else None,
    )


def inference_log(settings: Settings) -> tuple[Any, Any]:
    """The logger, with its writer process (same settings, from the same environment), and the
    store for the server's own reads (the labels already stored, for POST /v1/feedback)."""
    from monitoring.logstore import get_log_store
    from serving.logger.client import InferenceLogger

    store = get_log_store(settings.log_store_url, **settings.log_store_options())  # a bad URL fails here, now
    logging.getLogger("serving").info("inference log: %s", settings.log_store_url)
    logger = InferenceLogger(
        [sys.executable, "-m", "serving.logger"], settings.logs.queue_events, settings.logs.flush_ms
    )
    return logger, store


def main() -> int:
    from common.errors import MLOpsError
    from common.settings import load_settings

    try:
        settings = load_settings()
    except MLOpsError as exc:
        print(f"serving: error: {exc}", file=sys.stderr)
        return exc.exit_code
    serve(settings)
    return 0
