"""Inference events from KServe's logger: on Kubernetes, an InferenceService's agent posts each
request and each response as a CloudEvent to its logger URL; this receiver pairs them by id and
hands them to the same log writer the model server feeds, so they reach the store as the model
server's own logged requests do (read back by `mlops logs query`, monitoring and retraining).

KServe's agent posts CloudEvents in binary mode: the body as the model was sent it (or answered),
the attributes as headers: ``ce-id`` (a request and its response share it), ``ce-type`` (ending in
``.request`` or ``.response``), ``ce-time``, ``ce-inferenceservicename``, ``ce-namespace``,
``ce-endpoint`` (``canary`` for the canary's, else the default's) and ``ce-component``
(``predictor`` or ``transformer``). The version is not among them: the deployment target, which
knows what each role serves, answers it (``Versions``).

What is acknowledged (2xx) has been handed to the store, its spool or its dead letters (the log
writer's promise: a store outage loses nothing). A request whose response never comes is kept
``hold_s``, then logged as an error event, so a window still counts it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from fastapi import FastAPI, Request  # at the top: FastAPI reads the handlers' annotations by name
from fastapi.responses import JSONResponse

from common.errors import InvalidInput
from monitoring.events import RequestBatch, encode_request, request_columns

REQUEST, RESPONSE = "request", "response"
ROW_INPUT = "input"  # the input V1 rows of plain values (lists, not named features) are logged as
HOLD_S = 60.0  # a request waits this long for its response


@dataclass(frozen=True)
class LoggedEvent:
    """One of KServe's logger CloudEvents, as posted."""

    id: str
    kind: str  # request | response
    service: str  # the InferenceService: the model
    namespace: str
    endpoint: str  # canary, or the default
    component: str  # predictor | transformer
    time_s: float
    body: bytes

    @classmethod
    def from_http(cls, headers: Mapping[str, str], body: bytes, received_s: float) -> LoggedEvent:
        """The event of a binary-mode CloudEvent; InvalidInput naming the header that is wrong."""
        lower = {k.lower(): v for k, v in headers.items()}
        missing = [h for h in ("ce-id", "ce-type", "ce-inferenceservicename") if not lower.get(h)]
        if missing:
            raise InvalidInput(f"not a KServe logger CloudEvent: header(s) {', '.join(missing)} missing")
        kind = lower["ce-type"].rsplit(".", 1)[-1]
        if kind not in (REQUEST, RESPONSE):
            raise InvalidInput(
                f"header ce-type: {lower['ce-type']!r} ends in neither '.request' nor '.response'"
            )
        return cls(
            lower["ce-id"], kind, lower["ce-inferenceservicename"], lower.get("ce-namespace", ""),
            lower.get("ce-endpoint", ""), lower.get("ce-component", "predictor"),
            _time_s(lower.get("ce-time"), received_s), body,
        )  # fmt: skip

    @property
    def role(self) -> str:
        return "canary" if self.endpoint == "canary" else "stable"


def _time_s(text: str | None, default: float) -> float:
    if not text:
        return default
    try:  # RFC 3339, with up to nanoseconds (Python reads microseconds)
        head, dot, rest = text.replace("Z", "+00:00").partition(".")
        if dot:
            digits = "".join(itertools.takewhile(str.isdigit, rest))
            text = f"{head}.{digits[:6]}{rest[len(digits) :]}"
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return default


def logged_request(request: LoggedEvent, response: LoggedEvent | None, version: str) -> bytes:
    """The logged request (monitoring.events' layout) of a request and its response; without a
    response, or with one that is not a prediction, an error request."""
    try:
        body = orjson.loads(request.body)
        protocol = "v2" if isinstance(body, dict) and "inputs" in body else "v1"
        rows = body["instances"] if protocol == "v1" else None
        row_input = ROW_INPUT if rows and not isinstance(rows[0], dict) else None
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        body, protocol, row_input = {}, "v1", None
        error = "the request body is not a V1 or V2 inference request"
    else:
        error = None
    outputs: dict[str, list[Any]] = {}
    if error is None and response is None:
        error = "no response was logged for it"
    elif error is None and response is not None:
        try:
            outputs = _outputs(orjson.loads(response.body), protocol)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            error = (
                f"the response is not a prediction: {str(response.body[:200], 'utf-8', 'replace')} ({exc})"
            )
    latency_s = max(0.0, response.time_s - request.time_s) if response is not None else 0.0
    if error is not None:  # the layout's error request: no rows, no body
        row_input, outputs = None, {}
    compact = orjson.dumps(body if error is None else {})  # one line: the layout's body has no newline
    return encode_request(
        request.time_s, latency_s, request.service, version, request.role, request.id, protocol, compact,
        row_input, outputs, error,
    )  # fmt: skip


def _outputs(answer: Any, protocol: str) -> dict[str, list[Any]]:
    """The named output columns of a V1 or V2 answer, as the model server logs its own: rows of
    dicts become a column per key, and a V1 row's scores by label (``{"legit": 0.9, "fraud":
    0.1}``, how the answer names the output tensor's columns) the scores in their order, as the
    tensor row the model server logs (the labels are the version's)."""
    if protocol == "v2":
        return request_columns({"inputs": answer["outputs"]}, "v2", None)
    rows = answer["predictions"]
    if not isinstance(rows, list) or not rows:
        raise ValueError("predictions: not a list of rows")
    if all(isinstance(row, dict) for row in rows):
        return {name: [_scores(row.get(name)) for row in rows] for name in rows[0]}
    return {"predictions": rows}


def _scores(value: Any) -> Any:
    if isinstance(value, dict) and value and all(isinstance(v, int | float) for v in value.values()):
        return list(value.values())
    return value


class Pairs:
    """Requests waiting for their responses, by CloudEvent id; responses that came first wait too
    (the agent posts the two concurrently). Whatever waits past ``hold_s`` comes out alone."""

    def __init__(self, hold_s: float = HOLD_S, most: int = 100_000) -> None:
        self.hold_s, self.most = hold_s, most
        self._waiting: OrderedDict[tuple[str, str], tuple[float, LoggedEvent]] = OrderedDict()

    def add(self, event: LoggedEvent, now_s: float) -> tuple[LoggedEvent, LoggedEvent] | None:
        """The pair this event completes (request, response), or None while its other half is away."""
        other = (event.service, event.id)
        waiting = self._waiting.pop(other, None)
        if waiting is not None and waiting[1].kind != event.kind:
            first = waiting[1]
            return (first, event) if first.kind == REQUEST else (event, first)
        self._waiting[other] = (now_s, event)
        return None

    def expired(self, now_s: float) -> list[LoggedEvent]:
        """The requests (and lone responses) that waited past ``hold_s``, or past ``most`` waiting."""
        out = []
        while self._waiting:
            key, (since, event) = next(iter(self._waiting.items()))
            if now_s - since < self.hold_s and len(self._waiting) <= self.most:
                break
            del self._waiting[key]
            out.append(event)
        return out

    def __len__(self) -> int:
        return len(self._waiting)


class Receiver:
    """Pairs the posted events and submits each pair, as a logged request, to the log writer;
    answers once the writer has handed it on (to the store, the spool or the dead letters)."""

    def __init__(
        self,
        writer: Any,
        versions: Callable[[str, str], str],
        hold_s: float = HOLD_S,
        ack_timeout_s: float = 30.0,
    ) -> None:
        self.writer, self.versions, self.ack_timeout_s = writer, versions, ack_timeout_s
        self.pairs = Pairs(hold_s)
        self.source = f"kserve-{socket.gethostname()}-{os.getpid()}-{time.time_ns():x}-"
        self._count = 0  # logged requests so far: the next one's event id
        self._lock = threading.Lock()  # pairs and the writer's submit: one caller at a time
        self.stats = {"requests": 0, "responses": 0, "logged": 0, "unpaired": 0, "refused": 0}

    async def receive(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """The status and body to answer a posted event with."""
        try:
            event = LoggedEvent.from_http(headers, body, time.time())
        except InvalidInput as exc:
            self.stats["refused"] += 1
            return 400, {"error": str(exc)}
        self.stats[f"{event.kind}s"] += 1
        with self._lock:
            now = time.monotonic()
            lines = [self._line(lone, None) for lone in self.pairs.expired(now) if lone.kind == REQUEST]
            self.stats["unpaired"] += len(lines)
            pair = self.pairs.add(event, now)
            if pair is not None:
                lines.append(self._line(*pair))
            if not lines:
                return 202, {"paired": False}
            batch = RequestBatch.scan(self.source, self._count, b"".join(line + b"\n" for line in lines))
            self._count += len(lines)
            mark = self.writer.submit(batch) if batch is not None else None
        if mark is None:
            return 503, {"error": "the log writer's queue is full: post again later"}
        if not await asyncio.to_thread(self.writer.wait_delivered, mark, self.ack_timeout_s):
            return 503, {"error": f"not written within {self.ack_timeout_s:.0f} s: post again later"}
        self.stats["logged"] += len(lines)
        return 200, {"paired": pair is not None, "logged": len(lines)}

    def _line(self, request: LoggedEvent, response: LoggedEvent | None) -> bytes:
        return logged_request(request, response, self.versions(request.service, request.role))


class Versions:
    """The version each role of a model serves, as the deployment target's ``status`` says; asked
    at most every ``ttl_s`` per model (a rollout changes it; events in between may name the one
    before). ``unknown`` when the target cannot say."""

    def __init__(self, status: Callable[[str], Any], ttl_s: float = 10.0) -> None:
        self.status, self.ttl_s = status, ttl_s
        self._known: dict[str, tuple[float, dict[str, str]]] = {}

    def __call__(self, model: str, role: str) -> str:
        now = time.monotonic()
        cached = self._known.get(model)
        if cached is None or now - cached[0] > self.ttl_s:
            roles: dict[str, str] = {}
            try:
                deployment = self.status(model)
                for name in ("stable", "canary"):
                    served = getattr(deployment, name, None)
                    if served is not None:
                        roles[name] = str(served.version)
            except Exception:  # the target away or the model unknown to it: said in the event
                roles = {}
            cached = self._known[model] = (now, roles)
        return cached[1].get(role, "unknown")


def create_app(receiver: Receiver) -> Any:
    """The receiver's HTTP face: ``POST /`` takes an event (KServe's logger URL points here),
    ``GET /healthz`` says how it goes."""
    app = FastAPI(title="mlops: KServe logger receiver", docs_url=None, redoc_url=None)

    @app.post("/")
    async def post(request: Request) -> JSONResponse:
        status, body = await receiver.receive(request.headers, await request.body())
        return JSONResponse(body, status_code=status)

    @app.get("/healthz")
    async def health() -> dict[str, Any]:
        return {"ok": True, "waiting": len(receiver.pairs), "backlog": receiver.writer.backlog,
                "spooled": receiver.writer.spool.events, **receiver.stats}  # fmt: skip

    return app


def serve(settings: Any, host: str, port: int, progress: Callable[[str], None]) -> int:
    """`mlops logs receive`: the receiver on ``host:port`` until stopped, writing to the
    configured store (its spool and dead letters under ``<state>/serving/kserve-*``)."""
    import uvicorn

    from monitoring.logstore import get_log_store
    from serving.logger.spool import Spool
    from serving.logger.writer import LogWriter
    from serving.targets import get_deployment_target

    logs, folder = settings.logs, settings.serving_dir
    writer = LogWriter(
        get_log_store(settings.log_store_url, **settings.log_store_options()),
        Spool(folder / "kserve-spool", logs.spool_max_bytes),
        Spool(folder / "kserve-dead-letter", logs.spool_max_bytes),
        logs.batch_events,
        flush_ms=min(logs.flush_ms, 20.0),  # an acknowledgement waits for it
        queue_events=logs.queue_events,
    )
    target = get_deployment_target(settings.deployment_target, settings)
    receiver = Receiver(writer, Versions(target.status))
    progress(f"receiving KServe's logger events at http://{host}:{port}/ into {settings.log_store_url}")
    try:
        uvicorn.run(create_app(receiver), host=host, port=port, log_level="warning")
    finally:
        writer.close()
    return 0
