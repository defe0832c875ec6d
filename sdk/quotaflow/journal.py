"""A local append-only journal for usage records the emitter cannot hold in memory.

When the broker is away long enough for the in-memory buffer to reach its bound, records go to
segment files in a directory instead (``journal<±n>.jsonl``, one record per line, in order).
Once the broker is back the emitter replays them, oldest first, before anything newer, with
their original ids and timestamps; a segment is deleted when all of it has been handed over.
A journal left by a process that stopped is replayed by the next one that opens it.

fsync policy (``client.journal_fsync``): ``batch`` (default) fsyncs after each batch the
emitter writes (every flush interval, so at most one interval of records can be lost with the
machine), ``always`` after every record, ``never`` leaves it to the OS. The directory is capped
(``client.journal_max_bytes``); past it records are dropped and counted, and the first drop is
logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from quotaflow.messages import Encodable, encode_records
from quotaflow.record import UsageRecord

log = logging.getLogger(__name__)

FsyncPolicy = Literal["never", "batch", "always"]

#: A segment is closed for writing past this size, so replayed ones can be deleted early.
SEGMENT_BYTES = 16 * 1024 * 1024


class Journal:
    def __init__(self, directory: Path, max_bytes: int, fsync: FsyncPolicy = "batch") -> None:
        self.directory = Path(directory)  # made on the first spill, not before
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.dropped = 0
        self.written = 0
        self.replayed = 0
        # segments by number; the first is read, the last written (numbers may go below zero:
        # records older than the whole journal are prepended as a new first segment)
        self._segments = sorted(
            int(p.stem[len("journal") :]) for p in self.directory.glob("journal*.jsonl")
        )
        #: bytes of each segment already handed over (only ever the first ones)
        self._offsets = self._load_offsets()
        self._size = sum(self._path(n).stat().st_size for n in self._segments)
        #: records a previous process left here (replayed before anything new)
        self.inherited = self._count_pending()

    # -- writing (the emitter thread) -------------------------------------------------------

    def append(self, records: Sequence[Encodable]) -> int:
        """Append records in order; returns how many were written (the rest were dropped)."""
        if not records:
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self._segments or self._path(self._segments[-1]).stat().st_size >= SEGMENT_BYTES:
            self._segments.append((self._segments[-1] + 1) if self._segments else 0)
        return self._write(self._segments[-1], records)

    def prepend(self, records: Sequence[Encodable]) -> int:
        """Journal records older than everything journaled so far (a process stopping with
        some in memory): they become a new first segment, replayed first."""
        if not records:
            return 0
        if not self._segments:
            return self.append(records)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._segments.insert(0, self._segments[0] - 1)
        return self._write(self._segments[0], records)

    def _write(self, segment: int, records: Sequence[Encodable]) -> int:
        written = 0
        with open(self._path(segment), "ab") as out:
            for record in records:
                line = encode_records([record]).strip(b"[]") + b"\n"
                if self._size + len(line) > self.max_bytes:
                    self._drop(len(records) - written)
                    break
                out.write(line)
                self._size += len(line)
                written += 1
                if self.fsync == "always":
                    out.flush()
                    os.fsync(out.fileno())
            if self.fsync == "batch":
                out.flush()
                os.fsync(out.fileno())
        self.written += written
        return written

    def _drop(self, count: int) -> None:
        if self.dropped == 0:
            log.error(
                "usage journal %s is full (%d bytes): dropping records", self.directory,
                self.max_bytes,
            )  # fmt: skip
        self.dropped += count

    # -- reading (the emitter thread, once the broker is back) ------------------------------

    @property
    def pending(self) -> int:
        """Records journaled and not yet handed back to the producer."""
        return self.inherited + self.written - self.replayed

    def _count_pending(self) -> int:
        count = 0
        for n in self._segments:
            with open(self._path(n), "rb") as src:
                src.seek(self._offsets.get(n, 0))
                count += sum(1 for line in src if line.endswith(b"\n"))
        return count

    def __bool__(self) -> bool:
        """Whether records wait to be replayed."""
        return self._size > sum(self._offsets.values())

    def read(self, limit: int) -> tuple[list[UsageRecord], int]:
        """Up to ``limit`` records from the oldest segment, and the offset to :meth:`commit`."""
        if not self._segments:
            return [], 0
        path = self._path(self._segments[0])
        records: list[UsageRecord] = []
        with open(path, "rb") as src:
            offset = self._offsets.get(self._segments[0], 0)
            src.seek(offset)
            for line in src:
                if not line.endswith(b"\n"):  # a torn last line (a crash mid-write)
                    break
                offset += len(line)
                try:
                    records.append(UsageRecord.model_validate(json.loads(line)))
                except ValueError:
                    log.error("unreadable usage journal line in %s skipped", path)
                if len(records) >= limit:
                    break
        return records, offset

    def commit(self, offset: int, count: int) -> None:
        """The records read up to ``offset`` were handed to the producer."""
        self.replayed += count
        first = self._segments[0]
        path = self._path(first)
        size = path.stat().st_size
        if offset >= size:  # all of it handed over: the segment goes
            self._size -= size
            path.unlink()
            self._segments.pop(0)
            self._offsets.pop(first, None)
        else:
            self._offsets[first] = offset
        self._save_offsets()

    # -- bookkeeping ------------------------------------------------------------------------

    def _path(self, n: int) -> Path:
        return self.directory / f"journal{n:+011d}.jsonl"

    def _load_offsets(self) -> dict[int, int]:
        try:
            raw = json.loads((self.directory / "read-offsets.json").read_text())
            return {int(k): int(v) for k, v in raw.items() if int(k) in self._segments}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_offsets(self) -> None:
        tmp = self.directory / "read-offsets.json.tmp"
        tmp.write_text(json.dumps(self._offsets))
        tmp.replace(self.directory / "read-offsets.json")
