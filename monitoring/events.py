"""The inference log's records: what monitoring and retraining read, and how a request is logged.

Defined once, here, with a schema version:

- ``InferenceEvent``: one predicted row, what every reader gets back (by model and time window);
- a *logged request*: one answered (or failed) request as the model server logs it, in one layout
  (``encode_request``: a JSON head, a tab, the request body as the client sent it); its rows are
  the events ``<event id>-<row>``, expanded when a store writes it (the search stores: a document
  per row) or when it is read (the embedded store);
- ``RequestBatch``: logged requests with consecutive event ids, one per line, as a store takes
  them (the embedded store keeps a batch as one record);
- ``Feedback``: a ground-truth label that arrives later, joined to its event by (request id, row).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import orjson

SCHEMA_VERSION = 1
STATUSES = ("ok", "error")
PROTOCOLS = ("v1", "v2")


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


class RowBlock(NamedTuple):
    """Rows answered together, as columns: a logged request's rows (or one single event). What a
    reader that wants columns gets (``LogStore.blocks``), without an event object per row."""

    ts_ms: int
    model: str
    version: str
    role: str
    request_id: str
    status: str
    rows: int
    inputs: dict[str, list[Any]]  # one value per row, as the application sent it
    outputs: dict[str, list[Any]]
    first_row: int = 0  # the row number of the first row (a single event's own row)


def event_block(event: InferenceEvent) -> RowBlock:
    return RowBlock(
        event.ts_ms, event.model, event.version, event.role, event.request_id, event.status, 1,
        {name: [value] for name, value in event.inputs.items()},
        {name: [value] for name, value in event.outputs.items()}, event.row,
    )  # fmt: skip


# --- a logged request ---------------------------------------------------------------------------
#
#   JSON [schema_version, ts_s, latency_s, rows, model, version, role, request_id, protocol,
#         row_input, outputs, error] + b"\t" + the request body as the client sent it
#
# ts_s is epoch seconds, latency_s seconds, outputs the named output columns (a row each); error is
# None for an answered request, else its message (then rows is 1, outputs {} and the body {}).
# ``protocol`` (v1 or v2) says how to take the input columns out of the body (``request_columns``)
# and ``row_input`` names the input V1 rows of plain values belong to (None if there is none): the
# server never encodes the inputs it decoded. orjson escapes tabs and newlines inside strings, and
# the server makes a body's JSON whitespace spaces: the first tab ends the head, and a logged
# request is one line. The head's first fields are numbers and its model the first string, so one
# regular expression over many lines finds their times, rows and models (``request_heads``)
# without a parse per request: that is how the log writer keeps its CPU off the server's cores.

_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'  # a JSON string (escapes and all), as one regex loop
_HEAD = rb"\[%d,(-?[0-9][0-9.eE+-]*),[^,]*,([0-9]+),(%b)," % (SCHEMA_VERSION, _STRING)
_ID = rb"\[%d,[^,]*,[^,]*,[0-9]+,(?:%b,){3}(%b)," % (SCHEMA_VERSION, _STRING, _STRING)
# After a newline: a literal first character lets the regex engine jump from line to line (a
# pattern starting with ``^`` under MULTILINE is tried at every byte: 12 times as slow on 3 KB lines).
_HEADS, _FIRST_HEAD = re.compile(rb"\n" + _HEAD), re.compile(_HEAD)
_IDS, _FIRST_ID = re.compile(rb"\n" + _ID), re.compile(_ID)


def request_heads(lines: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """The (ts_s, rows, model) of each line's head that fits the layout, in order, found by one
    regular expression over all the lines (no parse per request); the model as its JSON string."""
    first = _FIRST_HEAD.match(lines)
    return [first.groups()] + _HEADS.findall(lines) if first else _HEADS.findall(lines)


def logged_request_ids(lines: bytes) -> list[bytes]:
    """The request id of each line's head, as its JSON string (what ``known_requests`` looks for)."""
    first = _FIRST_ID.match(lines)
    return [first.group(1)] + _IDS.findall(lines) if first else _IDS.findall(lines)


def encode_request(
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
    error: str | None = None,
) -> bytes:
    """A logged request (the layout above); the model server's request path makes the same bytes
    inline (``serving.logger.client``), since every call costs there."""
    rows = 1 if error is not None else len(next(iter(outputs.values()), ()))
    head = (SCHEMA_VERSION, ts_s, latency_s, rows, model, version, role, request_id, protocol, row_input,
            outputs, error)  # fmt: skip
    return b"%b\t%b" % (orjson.dumps(head, default=plain, option=orjson.OPT_SERIALIZE_NUMPY), body)


class LoggedRequest(NamedTuple):
    """A logged request with its head read (``decode_request``); its body is read by ``events``."""

    event_id: str
    ts_ms: int
    model: str
    version: str
    role: str
    request_id: str
    rows: int  # events
    latency_ms: float
    protocol: str
    row_input: str | None
    outputs: dict[str, Any]
    error: str | None
    body: bytes

    def block(self) -> RowBlock:
        """Its rows as columns; a body that does not fit its head raises MalformedEvent."""
        if self.error is not None:
            return RowBlock(
                self.ts_ms, self.model, self.version, self.role, self.request_id, "error", 1, {}, {}
            )
        inputs, outputs = self._columns()
        return RowBlock(
            self.ts_ms, self.model, self.version, self.role, self.request_id, "ok", self.rows, inputs, outputs
        )

    def _columns(self) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        try:
            inputs = request_columns(orjson.loads(self.body), self.protocol, self.row_input)
            outputs = {name: _column(values) for name, values in self.outputs.items()}
        except (orjson.JSONDecodeError, AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise MalformedEvent(f"request {self.event_id}: body not readable: {exc!r}") from exc
        if any(len(column) != self.rows for column in (*inputs.values(), *outputs.values())):
            raise MalformedEvent(f"request {self.event_id}: columns are not all {self.rows} rows long")
        return inputs, outputs

    def events(self) -> list[InferenceEvent]:
        """One event per row, in event id order (``-10`` sorts before ``-2``, as in every store);
        a body that does not fit its head raises MalformedEvent."""
        if self.error is not None:
            return [self._event(0, {}, {}, "error", self.error)]
        inputs, outputs = self._columns()
        rows = range(self.rows)
        return [
            self._event(
                row,
                {name: column[row] for name, column in inputs.items()},
                {name: column[row] for name, column in outputs.items()},
            )
            for row in (sorted(rows, key=str) if self.rows > 10 else rows)
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


def decode_request(event_id: str, payload: bytes) -> LoggedRequest:
    """The request of a logged request's bytes (one line, no newline); MalformedEvent if it is none."""
    try:
        tab = payload.index(b"\t")
        head = orjson.loads(payload[:tab])
        (
            schema,
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
            error,
        ) = head
        if schema != SCHEMA_VERSION:
            raise MalformedEvent(f"request {event_id}: schema_version {schema!r} is not {SCHEMA_VERSION}")
        strings = (model, version, role, request_id)
        if (
            type(rows) is not int
            or rows < 1
            or not all(isinstance(value, str) for value in strings)
            or protocol not in PROTOCOLS
            or not (row_input is None or isinstance(row_input, str))
            or not isinstance(outputs, dict)
            or not (error is None or isinstance(error, str))
            or not (error is None or rows == 1)
        ):
            raise TypeError(f"head {head!r}")
        return LoggedRequest(
            event_id, int(float(ts_s) * 1000), model, version, role, request_id, rows,
            round(float(latency_s) * 1000, 3), protocol, row_input, outputs, error, payload[tab + 1 :],
        )  # fmt: skip
    except MalformedEvent:
        raise
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise MalformedEvent(f"request {event_id}: not a logged request: {exc!r}") from exc


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


class RequestBatch(NamedTuple):
    """Logged requests with consecutive event ids, one per line: ``body`` is their lines, each
    ending in a newline, and request ``i`` has the event id ``source`` + hex(``first`` + i).

    Made without a parse per request (``scan``: one regular expression over all the lines for
    their times, rows and models), so a store can keep it as one record; read by ``requests``.
    """

    source: str  # the event ids' prefix (one model server process)
    first: int
    count: int  # requests (lines)
    rows: int  # events
    ts_min_ms: int
    ts_max_ms: int
    models: tuple[str, ...]
    body: bytes

    @classmethod
    def scan(cls, source: str, first: int, lines: bytes) -> RequestBatch | None:
        """The batch of ``lines``; None if there are none, or a line's head does not fit the layout."""
        found = request_heads(lines)
        count = lines.count(b"\n")
        if not count or len(found) != count or not lines.endswith(b"\n"):
            return None
        times = [int(float(ts) * 1000) for ts, _, _ in found]
        try:
            models = tuple(sorted({orjson.loads(model) for model in {m for _, _, m in found}}))
        except orjson.JSONDecodeError:
            return None
        rows = sum(int(r) for _, r, _ in found)
        return cls(source, first, count, rows, min(times), max(times), models, lines)

    def event_id(self, index: int) -> str:
        return f"{self.source}{self.first + index:x}"

    def requests(self) -> Iterator[LoggedRequest | None]:
        """Its requests in order; None for a line that is not one (it keeps its place, and id)."""
        for index, line in enumerate(self.body.split(b"\n")[: self.count]):
            try:
                yield decode_request(self.event_id(index), line)
            except MalformedEvent:
                yield None

    def part(self, start: int, stop: int) -> RequestBatch | None:
        """Its requests ``start`` to ``stop`` (indices), as a batch of their own."""
        lines = self.body.split(b"\n")[start:stop]
        return RequestBatch.scan(self.source, self.first + start, b"".join(line + b"\n" for line in lines))


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


# --- labels ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feedback:
    """A ground-truth label for one predicted row, joined to its event by (request_id, row).

    A store keeps the first label of a (request_id, row); ``overwrite`` replaces one already there.
    """

    request_id: str
    row: int
    label: Any
    ts_ms: int = field(default_factory=lambda: now_ms())
    overwrite: bool = False

    @property
    def key(self) -> str:
        return f"{self.request_id}:{self.row}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "row": self.row,
            "label": self.label,
            "ts_ms": self.ts_ms,
            "overwrite": self.overwrite,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Feedback:
        try:
            overwrite = data.get("overwrite", False)
            if not isinstance(overwrite, bool):
                raise TypeError(f"overwrite {overwrite!r}")
            return cls(
                str(data["request_id"]), int(data["row"]), data["label"], int(data["ts_ms"]), overwrite
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise MalformedEvent(f"not a feedback record: {exc!r}") from exc


@dataclass(frozen=True)
class Labelled:
    """An event with the label that came back for it (None while none has)."""

    event: InferenceEvent
    label: Any | None


def prediction(outputs: Mapping[str, Any], output: str | None = None) -> Any:
    """The prediction of a row, from its named outputs: ``output`` (default: ``label`` if there is
    one, else the first), read as the best key of a mapping of scores, the position (``#i``) of
    the largest of a vector of scores, or the value itself. What the canary analysis and
    monitoring compare."""
    if not outputs:
        return None
    value = outputs.get(output or ("label" if "label" in outputs else next(iter(outputs))))
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        return f"#{int(np.argmax(value))}"  # a vector of scores: its largest position
    if isinstance(value, dict) and value:
        return max(value, key=value.get)  # scores by label
    return value


def now_ms() -> int:
    return time.time_ns() // 1_000_000
