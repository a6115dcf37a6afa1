"""The model server's HTTP front: the inference fast path, the admin API, then kserve's app.

A raw ASGI app in front of kserve's FastAPI application. It answers, itself and without pydantic:

- ``POST /v1/models/{name}:predict`` and ``POST /v2/models/{name}[/versions/{v}]/infer`` (JSON):
  body size checked before it is read, parsed with orjson, validated against the chosen version's
  signature, split between stable and canary, batched, answered with the version in the body and
  in ``x-model-version`` / ``x-model-role`` headers;
- ``/admin/v1/...``: load, traffic, promote, rollback, unload, status, a rollout's lease, behind a
  bearer token; while a lease is held, changes need its owner (``x-mlops-lease-owner``).

Everything else (health, readiness, model metadata, ``/metrics``, binary-tensor V2 requests) goes
to kserve's own application, which sees each model through ``deployments.RoutedModel``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

from common.errors import (
    BackendRefused,
    BackendUnavailable,
    InvalidInput,
    LeaseHeld,
    MLOpsError,
    ModelNotFound,
    ModelNotReady,
)
from monitoring.events import Feedback
from monitoring.logstore import LogStore
from serving import metrics
from serving.auth import token_matches
from serving.deployments import Deployments, Loaded
from serving.explain import explain
from serving.logger.client import InferenceLogger

if TYPE_CHECKING:
    from serving.workers import Cluster

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class PayloadTooLarge(InvalidInput):
    pass


class Unauthorized(MLOpsError):
    pass


class AdminDisabled(MLOpsError):
    pass


class Conflict(MLOpsError):
    pass


# The one table from errors to HTTP status codes.
HTTP_STATUS: list[tuple[type[Exception], int]] = [
    (PayloadTooLarge, 413),
    (InvalidInput, 400),
    (Unauthorized, 401),
    (ModelNotFound, 404),
    (Conflict, 409),
    (LeaseHeld, 409),
    (ModelNotReady, 503),
    (BackendUnavailable, 503),
    (AdminDisabled, 503),
    (MLOpsError, 500),
]


def status_for(exc: Exception) -> int:
    return next((code for kind, code in HTTP_STATUS if isinstance(exc, kind)), 500)


_V1_PREDICT = re.compile(r"^/v1/models/([^/:]+):(predict|explain)$")
_V2_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "torchscript": "pytorch_torchscript",
    "torch_export": "pytorch_exported_program",
}
_V2_METADATA = re.compile(r"^/v2/models/([^/]+)$")
_ADMIN = re.compile(r"^/admin/v1/models(?:/([^/]+))?(?:/(versions|traffic|promote|rollback|lease))?$")


class Front:
    def __init__(
        self,
        fallback: ASGIApp,
        deployments: Deployments,
        admin_token: str | None,
        max_body_bytes: int,
        logger: InferenceLogger | None = None,
        feedback_token: str | None = None,
        labels: LogStore | None = None,
        shadow_max_pending: int = 256,
        canary_fallback: bool = True,
        cluster: Cluster | None = None,
    ) -> None:
        self.fallback = fallback
        self.cluster = cluster  # one of several workers on the port (serving/workers.py); None: the only one
        self.logger = logger
        self.deployments = deployments
        self.admin_token = admin_token
        self.max_body_bytes = max_body_bytes
        self.feedback_token = feedback_token  # None: anyone on the (loopback) network may send labels
        self.labels = labels  # the log store, read to refuse a second label for a row
        self.shadow_max_pending = shadow_max_pending
        self.canary_fallback = canary_fallback  # a failed canary answer is retried on stable
        self._random = random.Random()
        self._worker = [(b"x-mlops-worker", b"%d" % cluster.index)] if cluster is not None else []
        self._shadow_tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            if method == "POST" and (match := _V1_PREDICT.match(path)):
                protocol = "v1" if match.group(2) == "predict" else "explain"
                return await self._infer(scope, receive, send, match.group(1), None, protocol)
            if method == "POST" and (match := _V2_INFER.match(path)) and not _binary(scope):
                return await self._infer(scope, receive, send, match.group(1), match.group(2), "v2")
            if path == "/v2/health/ready" and (reason := self._not_ready()):
                return await _respond(send, 503, {"ready": False, "reason": reason}, "", "", "")
            if path == "/metrics" and self.cluster is not None:
                text, content_type = self.cluster.metrics()
                return await _send(send, 200, text, "", "", "", content_type=content_type)
            if method == "GET" and (match := _V2_METADATA.match(path)):
                return await self._metadata(send, match.group(1))
            if method == "POST" and path == "/v1/feedback":
                return await self._feedback(scope, receive, send)
            if path.startswith("/admin/"):
                return await self._admin(scope, receive, send)
        await self.fallback(scope, receive, send)

    def _not_ready(self) -> str | None:
        # kserve would say ready with no model registered yet: not before the saved ones are back.
        if not self.deployments.restored:
            return "restoring deployments"
        return self.cluster.not_ready() if self.cluster is not None else None

    # --- inference ----------------------------------------------------------------------------

    async def _infer(
        self, scope: Scope, receive: Receive, send: Send, name: str, pinned: str | None, protocol: str
    ) -> None:
        started = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = _text(headers.get(b"x-request-id")) or uuid.uuid4().hex
        answered: Loaded | None = None
        routing = None
        role = "stable"
        raw = b""
        computing = False  # past the request's own checks: a failure now is the version's
        while True:
            try:
                if answered is None:
                    routing = self.deployments.routing(name)
                    answered, role, shadow = self._pick(routing, pinned, headers, name)
                    raw = await self._read_body(scope, receive, headers)
                body = _parse(raw)
                model = answered.model
                decoder = model.decoder
                if decoder is None:
                    raise ModelNotReady(f"model '{name}' version {model.version} is not loaded")
                inputs = decoder.v2(body) if protocol == "v2" else decoder.v1(body)
                computing = True
                if protocol == "explain":
                    payload = await self._explain(model, inputs, body)
                    shadow = None
                elif protocol == "v2":
                    outputs = await answered.batcher.submit(inputs)
                    payload = model.v2_body(outputs, body.get("id") or request_id)
                else:
                    outputs = await answered.batcher.submit(inputs)
                    payload = {
                        "predictions": model.v1_predictions(outputs),
                        "model_version": model.version,
                        "request_id": request_id,
                    }
                if shadow is not None:
                    self._mirror(shadow, inputs, request_id, protocol, raw, decoder.row_input)
                response = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
                ended = time.perf_counter()  # one clock read for the log and the latency metric
                if self.logger is not None and protocol != "explain":
                    # The body as it came (no second encoding of the inputs), the outputs, what answered.
                    self.logger.answered(
                        started, ended, model.name, answered.version, role, request_id, protocol, raw,
                        decoder.row_input, outputs,
                    )  # fmt: skip
                break
            except Exception as exc:
                code = status_for(exc)
                if code == 500:
                    log.exception("model %s: %s request failed", name, protocol)
                metrics.ERRORS.labels(name, str(code)).inc()
                version = answered.version if answered else ""
                if answered is not None:
                    metrics.requests(name, version, role, protocol, str(code)).inc()
                    if self.logger is not None and protocol != "explain":
                        self.logger.failed(
                            started,
                            answered.model.name,
                            version,
                            role,
                            request_id,
                            protocol,
                            _message(exc, code),
                        )
                fallback = routing.stable if routing is not None else None
                if computing and role == "canary" and pinned is None and self.canary_fallback and fallback:
                    # The canary failed where the request itself was fine: stable answers it, and the
                    # canary's failure stays in the log and the metrics for the canary analysis.
                    metrics.CANARY_FALLBACKS.labels(name, version).inc()
                    answered, role, shadow, computing = fallback, "stable", None, False
                    continue
                await _respond(
                    send, code, {"error": _message(exc, code)}, request_id, version, role if answered else ""
                )
                return
        metrics.requests(name, answered.version, role, protocol, "200").inc()
        metrics.latency(name, answered.version, role).observe(ended - started)
        await _send(send, 200, response, request_id, answered.version, role, self._worker)

    def _pick(
        self, routing: Any, pinned: str | None, headers: dict[bytes, bytes], name: str
    ) -> tuple[Loaded, str, Loaded | None]:
        """(the version that answers, its role, the version to mirror to)."""
        if pinned is None:
            sticky = _text(headers.get(b"x-user-key")) or _text(headers.get(b"x-request-id"))
            return routing.pick(sticky, self._random.random())
        answered = next((v for v in (routing.stable, routing.canary) if v and v.version == pinned), None)
        if answered is None:
            raise ModelNotFound(f"model '{name}' has no loaded version {pinned}")
        return answered, "stable" if answered is routing.stable else "canary", None

    async def _feedback(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Ground-truth labels, later: ``{"request_id": ..., "labels": [one per row]}`` (or
        ``"label"``); a row keeps its first label unless the body says ``"overwrite": true``."""
        headers = dict(scope["headers"])
        try:
            if self.logger is None:
                raise AdminDisabled(
                    "the inference log is off here (MLOPS_LOGS__ENABLED=false): no labels to join"
                )
            if self.feedback_token is not None and not token_matches(
                self.feedback_token, _text(headers.get(b"authorization"))
            ):
                raise Unauthorized("missing or wrong feedback token (Authorization: Bearer <token>)")
            body = _parse(await self._read_body(scope, receive, headers))
            items = _feedback_items(body)
            if not items[0].overwrite and self.labels is not None:
                rows = await asyncio.get_running_loop().run_in_executor(None, self._labelled_rows, items)
                if rows:
                    raise Conflict(
                        f"request '{items[0].request_id}' row(s) {rows} have a label already;"
                        ' send "overwrite": true to replace it'
                    )
            if not self.logger.feedback(items):
                raise BackendUnavailable("the inference log is saturated; retry shortly")
        except Exception as exc:
            code = status_for(exc)
            metrics.FEEDBACK.labels(str(code)).inc()
            await _respond(send, code, {"error": _message(exc, code)}, "", "", "")
            return
        metrics.FEEDBACK.labels("202").inc()
        await _respond(send, 202, {"accepted": len(items)}, "", "", "")

    def _labelled_rows(self, items: list[Feedback]) -> list[int]:
        """The rows of these labels that have one stored already (none known if the store is away:
        the writer's store keeps the first label all the same)."""
        assert self.labels is not None
        try:
            stored = self.labels.labels([(item.request_id, item.row) for item in items])
        except (BackendUnavailable, BackendRefused) as exc:
            log.warning("feedback: could not read the labels already stored: %s", exc)
            return []
        return sorted(row for _, row in stored)

    async def _metadata(self, send: Send, name: str) -> None:
        """V2 model metadata, with the versions loaded and the provider that computes."""
        try:
            routing = self.deployments.routing(name)
            answering, _, _ = routing.pick(None, 0.99)
        except MLOpsError as exc:
            await _respond(send, status_for(exc), {"error": str(exc)}, "", "", "")
            return
        model = answering.model
        loaded = [v for v in (routing.stable, routing.canary) if v is not None]
        body = {
            "name": name,
            "versions": [v.version for v in loaded],
            "platform": PLATFORMS[model.bundle.flavor],
            "inputs": model.get_input_types(),
            "outputs": model.get_output_types(),
            "parameters": {
                "stable_version": routing.stable.version if routing.stable else None,
                "canary_version": routing.canary.version if routing.canary else None,
                "canary_percent": routing.canary_percent,
                "mode": routing.mode,
                "providers": {v.version: v.model.provider for v in loaded},
            },
        }
        await _respond(send, 200, body, "", "", "")

    async def _explain(self, model: Any, inputs: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """`:explain`: attributions off the event loop (the model runs many rows for one answer)."""
        permutations = body.get("permutations", 32)
        target = body.get("target")
        if (
            not isinstance(permutations, int)
            or isinstance(permutations, bool)
            or not 2 <= permutations <= 512
        ):
            raise InvalidInput(f"field 'permutations' must be an integer from 2 to 512, got {permutations!r}")
        if target is not None and (not isinstance(target, int) or isinstance(target, bool)):
            raise InvalidInput(f"field 'target' must be an output index, got {target!r}")
        result = await asyncio.get_running_loop().run_in_executor(
            None, explain, model.compute, inputs, model.transformer, permutations, target
        )
        return {**result, "model_version": model.version}

    def _mirror(
        self,
        shadow: Loaded,
        inputs: dict[str, Any],
        request_id: str,
        protocol: str,
        body: bytes,
        row_input: str | None,
    ) -> None:
        """Shadow mode: the canary computes the same inputs; its answer is logged, not returned. At
        most ``shadow_max_pending`` wait at a time: past that a mirrored request is dropped (counted),
        so a slow shadow never builds a backlog, and stable's answers never wait for it."""
        name, version = shadow.model.name, shadow.version
        if len(self._shadow_tasks) >= self.shadow_max_pending:
            metrics.SHADOW_DROPPED.labels(name, version).inc()
            return

        async def run() -> None:
            started = time.perf_counter()
            try:
                outputs = await shadow.batcher.submit(inputs)
            except Exception:
                metrics.SHADOW_FAILURES.labels(name, version).inc()
                return
            if self.logger is not None:
                self.logger.answered(
                    started, time.perf_counter(), name, version, "shadow", request_id, protocol, body, row_input,
                    outputs,
                )  # fmt: skip

        task = asyncio.get_running_loop().create_task(run())
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _read_body(self, scope: Scope, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(
                f"request body of {int(declared)} bytes exceeds the limit of {self.max_body_bytes}"
            )
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidInput("client disconnected before the body was read")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    # --- admin API ----------------------------------------------------------------------------

    async def _admin(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        try:
            body = await self._read_body(scope, receive, headers)
        except Exception as exc:
            await _respond(send, status_for(exc), {"error": _message(exc, status_for(exc))}, "", "", "")
            return
        if self.cluster is not None and not self.cluster.leads:
            code, result = await self.cluster.forward(scope["method"], scope["path"], headers, body)
        else:
            code, result = await self.admin_call(scope["method"], scope["path"], headers, body)
        await _respond(send, code, result, "", "", "")

    async def admin_call(
        self, method: str, path: str, headers: dict[bytes, bytes], body: bytes
    ) -> tuple[int, Any]:
        """An admin request, checked and carried out: (HTTP status, the answer's JSON)."""
        try:
            if self.admin_token is None:
                raise AdminDisabled("the admin API is disabled: no admin token is configured")
            if not token_matches(self.admin_token, _text(headers.get(b"authorization"))):
                raise Unauthorized("missing or wrong admin token (Authorization: Bearer <token>)")
            match = _ADMIN.match(path)
            if match is None:
                raise ModelNotFound(f"no admin route {method} {path}")
            name, action = match.group(1), match.group(2)
            if name is not None and action != "lease" and method != "GET":
                self.deployments.check_owner(name, _text(headers.get(b"x-mlops-lease-owner")))
            result = await self._admin_action(method, name, action, _parse(body) if body else {})
        except Exception as exc:
            code = status_for(exc)
            if code == 500:
                log.exception("admin %s %s failed", method, path)
            return code, {"error": _message(exc, code)}
        return 200, result

    async def _admin_action(self, method: str, name: str | None, action: str | None, body: Any) -> Any:
        deployments = self.deployments
        if not isinstance(body, dict):
            raise InvalidInput("the request body must be a JSON object")
        if name is None:
            if method == "GET":
                return deployments.status()
        elif action is None and method == "GET":
            return deployments.status(name)
        elif action is None and method == "DELETE":
            return await deployments.unload(name)
        elif action == "versions" and method == "POST":
            return await deployments.load(
                name,
                _field(body, "version", (str, int)),
                _field(body, "uri", str),
                body.get("role", "canary"),
            )
        elif action == "traffic" and method == "PUT":
            percent = _field(body, "canary_percent", (int, float))
            return await deployments.set_traffic(name, float(percent), body.get("mode", "split"))
        elif action == "promote" and method == "POST":
            return await deployments.promote(name)
        elif action == "rollback" and method == "POST":
            return await deployments.rollback(name)
        elif action == "lease" and method == "GET":
            return deployments.lease(name)
        elif action == "lease" and method == "PUT":
            ttl_s = _field(body, "ttl_s", (int, float))
            record = body.get("record")
            if record is not None and not isinstance(record, dict):
                raise InvalidInput(f"field 'record' must be a JSON object, got {record!r}")
            return await deployments.take_lease(name, _field(body, "owner", str), float(ttl_s), record)
        elif action == "lease" and method == "DELETE":
            return await deployments.release_lease(name, _field(body, "owner", str))
        raise ModelNotFound(f"no admin route {method} for {'/'.join(p for p in (name, action) if p)}")


def _feedback_items(body: Any) -> list[Feedback]:
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    request_id = _field(body, "request_id", str)
    if "labels" in body:
        labels = body["labels"]
        if not isinstance(labels, list) or not labels:
            raise InvalidInput(f"field 'labels' must be a non-empty list (one label per row), got {labels!r}")
    elif "label" in body:
        labels = [body["label"]]
    else:
        raise InvalidInput("field 'labels' (one per row) or 'label' is required")
    if any(label is None for label in labels):
        raise InvalidInput("a label must not be null")
    overwrite = body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise InvalidInput(f"field 'overwrite' must be true or false, got {overwrite!r}")
    return [Feedback(request_id, row, label, overwrite=overwrite) for row, label in enumerate(labels)]


def _field(body: dict[str, Any], name: str, kinds: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise InvalidInput(f"field '{name}' is required and must be {expected}, got {value!r}")
    return value


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None


def _binary(scope: Scope) -> bool:
    """V2's binary tensor extension: left to kserve's own parser."""
    return any(key == b"inference-header-content-length" for key, _ in scope["headers"])


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value else None


def _message(exc: Exception, code: int) -> str:
    return (
        str(exc) if code != 500 or isinstance(exc, MLOpsError) else f"internal error ({type(exc).__name__})"
    )


async def _respond(send: Send, code: int, payload: Any, request_id: str, version: str, role: str) -> None:
    await _send(
        send, code, orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), request_id, version, role
    )


async def _send(
    send: Send,
    code: int,
    body: bytes,
    request_id: str,
    version: str,
    role: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if request_id:
        headers.append((b"x-request-id", request_id.encode("latin-1")))
    if version:
        headers.append((b"x-model-version", version.encode()))
        headers.append((b"x-model-role", role.encode()))
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
