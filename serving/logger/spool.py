"""The log writer's spool: what the store could not take yet, on disk, replayed in order.

A folder of files of pipe lines (``serving.logger.wire``), appended and fsynced a batch at a time,
replayed oldest first and deleted once stored. Bounded on disk: an append that would take the
folder past ``max_bytes`` writes nothing (the writer drops those events and counts them). Read a
chunk at a time, at start (to count what it holds) and on replay, so a spool of any size needs no
more memory than a chunk. The same class keeps the dead letters (what the store refused), which
nothing replays by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from serving.logger.wire import Item, PipeReader, encode, events

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20  # read a file this much at a time
FILE_BYTES = 16 << 20  # start a new file past this size


class Spool:
    def __init__(self, folder: Path, max_bytes: int, file_bytes: int = FILE_BYTES) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._file_bytes = file_bytes
        self._current: Path | None = None
        self._counts = {path: sum(events(items) for items in _chunks(path)) for path in self.files()}
        self.events = sum(self._counts.values())  # events it holds: requests' rows, and labels
        self.bytes = sum(path.stat().st_size for path in self._counts)

    def files(self) -> list[Path]:
        return _files(self.folder)

    def append(self, items: list[Item]) -> bool:
        """Write the items to the newest file (fsynced); False, writing nothing, at the cap."""
        data = b"".join(encode(item) for item in items)
        if not data:
            return True
        if self.bytes + len(data) > self.max_bytes:
            return False
        if self._current is None or self._current.stat().st_size >= self._file_bytes:
            self._current = _next_file(self.folder)
            self._counts[self._current] = 0
        with self._current.open("ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        held = events(items)
        self._counts[self._current] += held
        self.events += held
        self.bytes += len(data)
        return True

    def replay(self, write: Callable[[list[Item]], None]) -> None:
        """Write everything spooled through ``write``, oldest file first, a chunk at a time, and
        delete each file once it is all stored; raises what ``write`` raises (a file cut short is
        read again from its start next time: stores keep the first write of an event id)."""
        for path in self.files():
            if path == self._current:
                self._current = None  # anything appended from now on goes to a new file
            for items in _chunks(path):
                write(items)
            size = path.stat().st_size
            path.unlink()
            self.events -= self._counts.pop(path, 0)
            self.bytes -= size


def worker_folder(base: Path, index: int) -> Path:
    """Model server worker I's spool (or dead letters): ``base`` for the first (or only) one, else
    ``base-I``: each writer process appends to its own files."""
    return base if index == 0 else base.with_name(f"{base.name}-{index}")


def adopt(base: Path, workers: int) -> int:
    """Move into ``base`` (worker 0's folder) the files of workers numbered ``workers`` or more,
    left by a server that ran more workers, after its own files and in their order, so that they
    are replayed; call it before any writer of this server has started. Returns the files moved."""
    moved = 0
    for folder in sorted(base.parent.glob(f"{base.name}-*")):
        index = folder.name.removeprefix(f"{base.name}-")
        if not index.isdigit() or int(index) < workers:
            continue
        base.mkdir(parents=True, exist_ok=True)
        for path in _files(folder):
            path.rename(_next_file(base))
            moved += 1
        with contextlib.suppress(OSError):
            folder.rmdir()
    if moved:
        log.info("%s: took over %d file(s) of workers that no longer run", base, moved)
    return moved


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("spool-*.spool"))


def _next_file(folder: Path) -> Path:
    files = _files(folder)
    number = int(files[-1].stem.split("-")[1]) + 1 if files else 1
    return folder / f"spool-{number:09d}.spool"


def _chunks(path: Path) -> Iterator[list[Item]]:
    """The items of a spool file, a chunk at a time; a last line cut short (a crash) is skipped."""
    reader = PipeReader()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            if items := reader.feed(chunk):
                yield items
    if reader.rest:
        log.error("spool %s: skipping a line cut short (by a crash?)", path)
