"""The inference event: one record per predicted row, the input of monitoring and retraining.

Defined once, here, with a schema version. Serving logs whole requests (``InferenceRequest``:
columns of rows, encoded once on the request path as a ``LoggedRequest``; an answered request's
inputs are the request body as the client sent it, see ``answered_payload``) and ground-truth
labels that arrive later (``Feedback``, keyed by request id and row); the log stores keep both and
give back one ``InferenceEvent`` per row: monitoring and retraining read those by model and time
window.
A request's rows are the events ``<event_id>-<row>``, whether a store expands the request when it
is written (the search stores: one document per row) or when it is read (the embedded store).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import orjson

SCHEMA_VERSION = 1
STATUSES = ("ok", "error")


class MalformedEvent(ValueError):
    """A stored record that is not a valid event (a reader skips it and counts it)."""


@dataclass(frozen=True)
class InferenceEvent:
    event_id: str  # unique; a store keeps the first write of an id, so a replay never duplicates
    ts_ms: int  # when the prediction was answered, epoch milliseconds (UTC)
    model: str
    version: str
    role: str  # stable | canary | shadow
    request_id: str
    row: int  # the row's position in its request
    inputs: dict[str, Any]  # named features as the application sent them (raw, before any transform)
    outputs: dict[str, Any]  # named outputs as returned (label, scores, ...)
    latency_ms: float  # of the whole request the row came in
    status: str = "ok"
    error: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "event_id": self.event_id,
            "ts_ms": self.ts_ms,
            "model": self.model,
            "version": self.version,
            "role": self.role,
            "request_id": self.request_id,
            "row": self.row,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "latency_ms": self.latency_ms,
            "status": self.status,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InferenceEvent:
        """Parse a stored record; anything that does not fit raises MalformedEvent."""
        try:
            version = int(data.get("schema_version", 0))
            if version != SCHEMA_VERSION:
                raise MalformedEvent(f"schema_version {version} is not {SCHEMA_VERSION}")
            event = cls(
                event_id=str(data["event_id"]),
                ts_ms=int(data["ts_ms"]),
                model=str(data["model"]),
                version=str(data["version"]),
                role=str(data["role"]),
                request_id=str(data["request_id"]),
                row=int(data["row"]),
                inputs=dict(data["inputs"]),
                outputs=dict(data["outputs"]),
                latency_ms=float(data["latency_ms"]),
                status=str(data.get("status", "ok")),
                error=data.get("error"),
                schema_version=version,
            )
        except MalformedEvent:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvent(f"not an inference event: {exc!r}") from exc
        if event.status not in STATUSES:
            raise MalformedEvent(f"status {event.status!r} is not one of {STATUSES}")
        return event


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much, per request
class InferenceRequest:
    """One answered request: named columns with one entry per row (a failed request has none)."""

    event_id: str  # the request's own id, unique; its rows are the events <event_id>-<row>
    ts_ms: int
    model: str
    version: str
    role: str
    request_id: str
    latency_ms: float
    inputs: Mapping[str, Any]  # column per feature: arrays on the request path, lists once decoded
    outputs: Mapping[str, Any]
    status: str = "ok"
    error: str | None = None

    @property
    def rows(self) -> int:
        """How many events the request holds (a failed request is one event with its error)."""
        if self.status != "ok" or not self.inputs:
            return 1
        return len(next(iter(self.inputs.values())))

    def events(self) -> list[InferenceEvent]:
        """One event per row, in event id order (``-10`` sorts before ``-2``, as in every store)."""
        if self.status != "ok" or not self.inputs:
            return [self._event(0, {}, {}, "error", self.error)]
        inputs = {name: _column(values) for name, values in self.inputs.items()}
        outputs = {name: _column(values) for name, values in self.outputs.items()}
        rows = range(len(next(iter(inputs.values()))))
        return [
            self._event(
                row,
                {name: column[row] for name, column in inputs.items()},
                {name: column[row] for name, column in outputs.items()},
            )
            for row in (sorted(rows, key=str) if len(rows) > 10 else rows)
        ]

    def _event(
        self,
        row: int,
        inputs: dict[str, Any],
        outputs: dict[str, Any],
        status: str = "ok",
        error: str | None = None,
    ) -> InferenceEvent:
        return InferenceEvent(
            f"{self.event_id}-{row}", self.ts_ms, self.model, self.version, self.role, self.request_id,
            row, inputs, outputs, self.latency_ms, status, error,
        )  # fmt: skip

    def header(self) -> tuple[str, int, str, str, str, str, int]:
        """What a store indexes: (event_id, ts_ms, model, version, role, request_id, rows)."""
        return (self.event_id, self.ts_ms, self.model, self.version, self.role, self.request_id, self.rows)

    def payload(self) -> bytes:
        """The rest, encoded once (orjson, arrays as they are): latency, columns, status."""
        return orjson.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "latency_ms": self.latency_ms,
                "inputs": self.inputs,
                "outputs": self.outputs,
                "status": self.status,
                "error": self.error,
            },
            default=plain,
            option=orjson.OPT_SERIALIZE_NUMPY,
        )

    def logged(self) -> LoggedRequest:
        return LoggedRequest(*self.header(), self.payload())

    @classmethod
    def from_logged(cls, logged: LoggedRequest) -> InferenceRequest:
        """Header and payload back together; anything that does not fit raises MalformedEvent."""
        try:
            if logged.body.startswith(b"["):  # an answered request, as the model server logs it
                data = _answered_fields(logged.body)
            else:
                data = orjson.loads(logged.body)
            version = int(data.get("schema_version", 0))
            if version != SCHEMA_VERSION:
                raise MalformedEvent(f"schema_version {version} is not {SCHEMA_VERSION}")
            if "request" in data:  # an answered request logged as its body
                data["inputs"] = request_columns(data["request"], data["protocol"], data["row_input"])
            request = cls(
                event_id=str(logged.event_id),
                ts_ms=int(logged.ts_ms),
                model=str(logged.model),
                version=str(logged.version),
                role=str(logged.role),
                request_id=str(logged.request_id),
                latency_ms=float(data["latency_ms"]),
                inputs=dict(data["inputs"]),
                outputs=dict(data["outputs"]),
                status=str(data.get("status", "ok")),
                error=data.get("error"),
            )
            if request.status not in STATUSES:
                raise MalformedEvent(f"status {request.status!r} is not one of {STATUSES}")
            if request.status == "ok":
                columns = [*request.inputs.values(), *request.outputs.values()]
                if any(len(column) != logged.rows for column in columns):
                    raise MalformedEvent(f"columns are not all {logged.rows} rows long")
        except MalformedEvent:
            raise
        except (orjson.JSONDecodeError, AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise MalformedEvent(f"not an inference request: {exc!r}") from exc
        return request


# An answered request, as the model server logs it and the embedded store keeps it (a payload):
#   JSON [schema_version, ts_s, latency_s, rows, model, version, role, request_id, protocol,
#         row_input, outputs] + b"\t" + the request body as the client sent it (V1 or V2 JSON)
# The model server makes it with one orjson call on its request path (serving.logger; the same
# as answered_payload) and never encodes the inputs it decoded: a reader takes the columns out of
# the body (request_columns). ``row_input`` names the input V1 rows of plain values belong to
# (None if there is none); ts_s is epoch seconds, latency_s seconds. orjson escapes tabs, so the
# first tab ends the head. The head's first fields are numbers and its strings come next, so the
# log writer finds the time, rows and model of a whole hand-over with one regular expression
# (ANSWERED_HEAD) instead of a parse per request. (Earlier layouts are still read: the same head
# without ``rows``, and a JSON object with the body under "request".)
ANSWERED_HEAD = re.compile(
    rb'\na\[%d,(-?[0-9][0-9.eE+-]*),[^,]*,([0-9]+),("[^"\\]*"),' % SCHEMA_VERSION
)  # after a newline: b"a" (a pipe line, see serving.logger) + the head, to its model


def answered_payload(
    ts_s: float,
    latency_s: float,
    model: str,
    version: str,
    role: str,
    request_id: str,
    protocol: str,
    body: bytes,
    row_input: str | None,
    outputs: Mapping[str, Any],
) -> bytes:
    """The payload of an answered request (the layout above)."""
    rows = len(next(iter(outputs.values()), ()))
    head = (
        SCHEMA_VERSION,
        ts_s,
        latency_s,
        rows,
        model,
        version,
        role,
        request_id,
        protocol,
        row_input,
        outputs,
    )
    return b"%b\t%b" % (orjson.dumps(head, default=plain, option=orjson.OPT_SERIALIZE_NUMPY), body)


def logged_answer(event_id: str, payload: bytes) -> LoggedRequest:
    """The request a store keeps for an answered request's payload; MalformedEvent if it is none."""
    try:
        head = orjson.loads(payload[: payload.index(b"\t")])
        if len(head) == 11:
            _, ts_s, _, rows, model, version, role, request_id, _, _, _ = head
        else:  # the head before it held the rows
            _, ts_s, _, model, version, role, request_id, _, _, outputs = head
            first = next(iter(outputs.values()))
            rows = len(first) if isinstance(first, list) else 1
        if type(rows) is not int:
            raise TypeError(f"rows {rows!r}")
        return LoggedRequest(event_id, int(ts_s * 1000), model, version, role, request_id, rows, payload)
    except (orjson.JSONDecodeError, AttributeError, StopIteration, TypeError, ValueError) as exc:
        raise MalformedEvent(f"not an answered request: {exc!r}") from exc


def _answered_fields(payload: bytes) -> dict[str, Any]:
    head, body = payload.split(b"\t", 1)
    version, _, latency_s, *_, protocol, row_input, outputs = orjson.loads(head)
    return {
        "schema_version": version,
        "latency_ms": round(latency_s * 1000, 3),
        "protocol": protocol,
        "row_input": row_input,
        "request": orjson.loads(body),
        "outputs": outputs,
    }


def request_columns(body: Mapping[str, Any], protocol: str, row_input: str | None) -> dict[str, list[Any]]:
    """The named input columns of a V1 or V2 request body that a model server accepted: one entry
    per row, values as the client sent them. Raises KeyError, IndexError or TypeError on any other."""
    if protocol == "v2":
        return {tensor["name"]: _rows(tensor["data"], tensor["shape"]) for tensor in body["inputs"]}
    if protocol != "v1":
        raise KeyError(f"protocol {protocol!r}")
    rows = body["instances"]
    if isinstance(rows[0], list):
        if not isinstance(row_input, str):
            raise TypeError("rows of plain values, and no input named for them")
        return {row_input: rows}
    return {name: [row[name] for row in rows] for name in rows[0]}


def _rows(data: Any, shape: list[int]) -> list[Any]:
    """V2 tensor data as its ``shape[0]`` rows: as sent when it is nested by rows already, else
    flattened and cut to the shape (a server accepts any nesting with the right number of values)."""
    if not shape:  # a scalar tensor: one row
        return [data]
    if len(data) == shape[0] and (len(shape) == 1 or all(isinstance(row, list) for row in data)):
        return data
    return _cut(_flat(data), shape)


def _flat(data: list[Any]) -> list[Any]:
    return [value for item in data for value in (_flat(item) if isinstance(item, list) else (item,))]


def _cut(flat: list[Any], shape: list[int]) -> list[Any]:
    if len(shape) == 1:
        return flat
    size = math.prod(shape[1:])
    return [_cut(flat[start : start + size], shape[1:]) for start in range(0, len(flat), size)]


class LoggedRequest(NamedTuple):
    """A request encoded once by the model server: the columns a store indexes, and the payload.

    The field order is the embedded store's column order: it inserts these tuples as they are.
    """

    event_id: str
    ts_ms: int
    model: str
    version: str
    role: str
    request_id: str
    rows: int
    body: bytes  # InferenceRequest.payload()

    def events(self) -> list[InferenceEvent]:
        return InferenceRequest.from_logged(self).events()


class AnsweredBatch(NamedTuple):
    """Answered requests handed over together, kept as they came: the lines of one hand-over (or a
    run of it), b"a" + payload + b"\n" each, whose event ids are ``source`` + hex(``first`` + i).

    The log writer stores a hand-over as one record (``scan``: one regular expression over it for
    its times, rows and models, no parse per request); a reader expands it (``requests``).
    """

    source: str  # the event ids' prefix: one model server process
    first: int
    count: int  # requests (lines)
    rows: int  # events
    ts_min_ms: int
    ts_max_ms: int
    models: tuple[str, ...]
    body: bytes

    @classmethod
    def scan(cls, source: str, first: int, lines: bytes) -> AnsweredBatch | None:
        """The batch of ``lines`` (each b"a" + an answered payload + b"\n"); None if a line's head
        is not of the current layout (the caller reads those one by one)."""
        found = ANSWERED_HEAD.findall(b"\n" + lines[:-1])  # every line starts after a newline
        count = lines.count(b"\n")
        if len(found) != count or not count:
            return None
        times = [int(float(ts) * 1000) for ts, _, _ in found]
        try:
            models = tuple(sorted({orjson.loads(model) for model in {m for _, _, m in found}}))
        except orjson.JSONDecodeError:
            return None
        rows = sum(map(int, (r for _, r, _ in found)))
        return cls(source, first, count, rows, min(times), max(times), models, lines)

    def event_id(self, index: int) -> str:
        return f"{self.source}{self.first + index:x}"

    def requests(self) -> Iterator[LoggedRequest | None]:
        """Its requests in order; None for a line that is not one (it keeps its place, and id)."""
        for index, line in enumerate(self.body.split(b"\n")[: self.count]):
            try:
                yield logged_answer(self.event_id(index), line[1:])
            except MalformedEvent:
                yield None

    def part(self, start: int, stop: int) -> AnsweredBatch | None:
        """Its requests ``start`` to ``stop`` (indices), as a batch of their own."""
        lines = self.body.split(b"\n")[start:stop]
        return AnsweredBatch.scan(self.source, self.first + start, b"".join(line + b"\n" for line in lines))


def batch_requests(batches: Iterable[AnsweredBatch]) -> tuple[list[LoggedRequest], list[str]]:
    """The requests of batches, and "<event id>: why" for each line of them that is not one (a
    store that writes them as requests refuses those, counted, instead of losing them unsaid)."""
    requests: list[LoggedRequest] = []
    unreadable: list[str] = []
    for batch in batches:
        for index, request in enumerate(batch.requests()):
            if request is None:
                unreadable.append(f"{batch.event_id(index)}: not an answered request")
            else:
                requests.append(request)
    return requests, unreadable


def _column(values: Any) -> list[Any]:
    if type(values) is list:  # decoded from JSON: plain values already
        return values
    if isinstance(values, np.ndarray):
        values = values.tolist()
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def plain(value: Any) -> Any:
    """orjson's ``default`` for what it does not serialize itself: arrays of strings (object
    dtype), bytes, and mappings other than dicts."""
    if isinstance(value, np.ndarray):
        return [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot log a {type(value).__name__}")


@dataclass(frozen=True)
class Feedback:
    """A ground-truth label for one predicted row, joined to its event by (request_id, row)."""

    request_id: str
    row: int
    label: Any
    ts_ms: int = field(default_factory=lambda: now_ms())

    @property
    def key(self) -> str:
        return f"{self.request_id}:{self.row}"

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "row": self.row, "label": self.label, "ts_ms": self.ts_ms}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Feedback:
        try:
            return cls(str(data["request_id"]), int(data["row"]), data["label"], int(data["ts_ms"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvent(f"not a feedback record: {exc!r}") from exc


@dataclass(frozen=True)
class Labelled:
    """An event with the label that came back for it (None while none has)."""

    event: InferenceEvent
    label: Any | None


def now_ms() -> int:
    return time.time_ns() // 1_000_000
