"""The inference log's wire format: the pipe from the model server to its writer, and the spool.

One item a line:

    [...]\\t<body>\\n         a logged request (``monitoring.events.encode_request``), the next event id
    i["<prefix>",<first>]\\n  the requests after it have the ids prefix + hex(first), + hex(first + 1), ...
    f[{...}, ...]\\n           labels (``Feedback.to_dict``)

A hand-over (what the model server sends every flush interval) is an id line, its requests, then
any labels; a spool file holds hand-overs as they came. A logged request holds no newline (orjson
escapes them in strings, and the server makes a body's JSON whitespace spaces), so a newline ends
every line, and a request line is the only kind that starts with ``[``. The writer keeps a run of
request lines as it came, one ``RequestBatch`` (one regular expression over the run finds its
times, rows and models: no parse per request).
"""

from __future__ import annotations

import logging
import os
import re
import uuid

import orjson

from monitoring.events import Feedback, MalformedEvent, RequestBatch

log = logging.getLogger(__name__)

Item = RequestBatch | list[Feedback]  # what the writer stores
IOV_MAX = 1024  # buffers per writev (Linux)
PIPE_BYTES = 1 << 20  # the pipe's size: Linux's default /proc/sys/fs/pipe-max-size
# The newline before a line that is not a request: one pass over a hand-over finds where its run
# of requests ends (a find per other kind of line took several times as long on lines of 1.6 KB).
_OTHER_LINE = re.compile(rb"\n[^\[]")


def id_line(prefix: str, first: int) -> bytes:
    return b"i%b\n" % orjson.dumps([prefix, first])


def encode(item: Item) -> bytes:
    """The lines of an item, as in the pipe (and the spool)."""
    if isinstance(item, RequestBatch):
        return id_line(item.source, item.first) + item.body
    return b"f%b\n" % orjson.dumps([f.to_dict() for f in item])


def events(items: list[Item]) -> int:
    """How many events: a batch's rows, and one per label."""
    return sum(item.rows if isinstance(item, RequestBatch) else len(item) for item in items)


class PipeReader:
    """The items of pipe (or spool) bytes, however they were cut, with the event ids of requests.

    ``feed`` takes whatever the pipe held and returns the items of its whole lines (the start of a
    line whose end has not come yet waits in ``rest``): a run of request lines is one batch. A line
    that cannot be read is skipped, logged and counted (``malformed``); a request line takes its
    event id whether it is readable or not, so the lines after it keep theirs when a hand-over is
    read again.
    """

    def __init__(self) -> None:
        self._prefix = f"{uuid.uuid4().hex[:12]}w"  # until the first id line (a hand-over starts with one)
        self._next = 0
        self.rest = b""
        self.malformed = 0

    def feed(self, data: bytes) -> list[Item]:
        data = self.rest + data if self.rest else data
        end = data.rfind(b"\n") + 1
        data, self.rest = data[:end], data[end:]
        items: list[Item] = []
        at = 0
        while at < end:
            if data.startswith(b"[", at):
                other = _OTHER_LINE.search(data, at)  # where the run of requests ends
                stop = other.start() + 1 if other else end
                items += self._requests(data[at:stop])
            else:
                stop = data.index(b"\n", at) + 1
                item = self._other(data[at : stop - 1])
                if item is not None:
                    items.append(item)
            at = stop
        return items

    def _requests(self, lines: bytes) -> list[Item]:
        """A run of request lines: one batch; a line whose head does not fit the layout is skipped
        (its id taken all the same), and the lines around it make batches of their own."""
        batch = RequestBatch.scan(self._prefix, self._next, lines)
        if batch is not None:
            self._next += batch.count
            return [batch]
        items: list[Item] = []
        run: list[bytes] = []  # readable lines in a row, the first of them numbered ``first``
        first = self._next
        for line in lines[:-1].split(b"\n"):
            number, self._next = self._next, self._next + 1
            if RequestBatch.scan(self._prefix, number, line + b"\n") is not None:
                first = number if not run else first
                run.append(line + b"\n")
                continue
            self._skip(MalformedEvent(f"request {self._prefix}{number:x}: not a logged request"))
            items += self._batch(first, run)
            run = []
        return items + self._batch(first, run)

    def _batch(self, first: int, run: list[bytes]) -> list[Item]:
        if not run:
            return []
        batch = RequestBatch.scan(self._prefix, first, b"".join(run))
        return [batch] if batch is not None else []

    def _other(self, line: bytes) -> list[Feedback] | None:
        """An id line (None: no item) or a line of labels."""
        try:
            value = orjson.loads(line[1:])
            if line.startswith(b"i"):
                prefix, first = value
                if not isinstance(prefix, str) or type(first) is not int:
                    raise TypeError(f"{prefix!r}, {first!r}")
                self._prefix, self._next = prefix, first
                return None
            if line.startswith(b"f"):
                return [Feedback.from_dict(f) for f in value]
            raise MalformedEvent(f"unknown kind of line {line[:1]!r}")
        except (orjson.JSONDecodeError, MalformedEvent, TypeError, ValueError) as exc:
            self._skip(exc)
            return None

    def _skip(self, exc: Exception) -> None:
        self.malformed += 1
        log.error("skipping an unreadable line of the inference log: %s", exc)


def write_all(fd: int, buffers: list[bytes]) -> None:
    """Write the buffers to ``fd`` in order, a writev per ``IOV_MAX`` of them (no copy joined)."""
    for start in range(0, len(buffers), IOV_MAX):
        part = buffers[start : start + IOV_MAX]
        sent = os.writev(fd, part)
        if sent < sum(map(len, part)):  # cut short (a signal): the rest in plain writes
            rest = memoryview(b"".join(part))[sent:]
            while rest:
                rest = rest[os.write(fd, rest) :]
