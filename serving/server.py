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
from typing import TYPE_CHECKING, Any

from common.settings import Settings

if TYPE_CHECKING:
    from serving.workers import Cluster

ASGIApp = Any


def run_model_server(
    port: int,
    host: str,
    models: list[Any] | None = None,
    wrap: Callable[[ASGIApp], ASGIApp] | None = None,
    predictor_config: Any | None = None,
    on_start: Callable[[Any], Awaitable[None]] | None = None,
    on_stop: Callable[[], None] | None = None,
    shared_port: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. ``on_start(model_repository)`` runs as a task once the loop runs;
    ``on_stop()`` once the server has stopped answering (to drain what it buffered). With
    ``shared_port`` (one of several workers), ``on_start`` runs to its end first, then the port is
    bound with SO_REUSEPORT, then ``shared_port()`` is called: the worker listens from there."""
    # kserve parses sys.argv when imported: a flag of ours with the same name would silently change
    # its defaults. Everything it needs is passed explicitly below.
    sys.argv = sys.argv[:1]
    from kserve import ModelServer
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    class _RESTServer(RESTServer):
        async def start(self, sockets: list[Any] | None = None) -> None:  # type: ignore[override]
            await self._server.serve(sockets=sockets)  # the application: created by main() below

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
                sockets = None
                rest.create_application()  # the front exists before on_start runs
                if shared_port is not None:
                    from serving.workers import reuseport_socket

                    if on_start is not None:
                        await on_start(self.registered_models)
                    sockets = [reuseport_socket(host, port)]
                    asyncio.get_running_loop().call_soon(shared_port)
                elif on_start is not None:
                    started = asyncio.get_running_loop().create_task(on_start(self.registered_models))
                try:
                    await rest.start(sockets)
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


def serve(settings: Settings, cluster: Cluster | None = None) -> None:
    """The stack's model server: the fast front, deployments restored from the state file; or one
    worker of several (``cluster``, serving/workers.py), whose routing is the leading worker's."""
    from serving.auth import admin_token, feedback_token
    from serving.deployments import Deployments
    from serving.http import Front
    from serving.workers import compute_threads

    token = admin_token(settings)
    holder: dict[str, Any] = {}
    logger, labels = inference_log(settings, cluster) if settings.logs.enabled else (None, None)

    def wrap(app: ASGIApp) -> ASGIApp:
        holder["front"] = Front(
            app,
            holder["deployments"],
            token,
            settings.serving.max_body_bytes,
            logger,
            feedback_token=feedback_token(settings),
            labels=labels,
            shadow_max_pending=settings.serving.shadow_max_pending,
            canary_fallback=settings.serving.canary_fallback,
            cluster=cluster,
        )
        return holder["front"]

    async def on_start(repository: Any) -> None:
        deployments = holder["deployments"]
        deployments.attach(repository)
        if cluster is not None and not cluster.leads:
            await cluster.follow(deployments)
            deployments.restored = True
            return
        await deployments.restore()
        holder["lease_watch"] = asyncio.get_running_loop().create_task(deployments.watch_leases())
        if cluster is not None:
            await cluster.lead(deployments, holder["front"].admin_call)

    workers = cluster.count if cluster is not None else 1
    leads = cluster is None or cluster.leads
    holder["deployments"] = Deployments(settings, compute_threads(settings, workers), persist=leads)
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
        shared_port=cluster.mark_ready if cluster is not None else None,
    )


def inference_log(settings: Settings, cluster: Cluster | None = None) -> tuple[Any, Any]:
    """The logger, with its writer process (same settings, from the same environment), and the
    store for the server's own reads (the labels already stored, for POST /v1/feedback)."""
    from monitoring.logstore import get_log_store
    from serving.logger.client import InferenceLogger

    store = get_log_store(settings.log_store_url, **settings.log_store_options())  # a bad URL fails here, now
    logging.getLogger("serving").info("inference log: %s", settings.log_store_url)
    worker = [f"--worker={cluster.index}/{cluster.count}"] if cluster is not None else []
    logger = InferenceLogger(
        [sys.executable, "-m", "serving.logger", *worker], settings.logs.queue_events, settings.logs.flush_ms
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
    if settings.serving.workers > 1:
        from serving.workers import supervise

        return supervise(settings)
    serve(settings)
    return 0
