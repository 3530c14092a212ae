"""Usage rows waiting on an ingress replica's local disk while the ledger cannot store them.

Each `Spill` owns the files named after it in one directory of its node: a lock file, held
(`flock`) as long as its process lives, and segments of JSON lines, one row a line, appended to
and sent oldest first, each deleted once the ledger has acknowledged its rows. A process that dies
releases its lock with it, so another `Spill` in that directory (the ingress replica that replaces
it, on that node) sees the lock free and adopts the dead one's segments, renaming them its own:
rows on disk outlive the replica that wrote them. A segment keeps the time it was begun in its
name, so adopted ones keep their place, oldest first.

Bounded in rows (each bounded in size, `usage_store.WIDTHS`): past the bound, rows are refused and
the caller counts and logs them. The file writes are small and on the replica's event loop, only
while the ledger fails; a row is flushed to the OS as it is written (a process crash keeps it; a
machine crash may not).
"""

import fcntl
import json
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from serve_app.tenancy.usage_store import UsageRow

logger = logging.getLogger("ray.serve")

SEGMENT_ROWS = 5000
"""The most rows in one segment, which is sent in one call."""


@dataclass
class Segment:
    path: Path
    begun_ns: int
    rows: int
    read: bool = False
    """Read once already: its unreadable lines are reported once, however often it is sent."""


class Spill:
    def __init__(self, directory: str | Path, max_rows: int) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._max_rows = max_rows
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._lock = (self.directory / f"{self._owner}.lock").open("a")
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._segments: deque[Segment] = deque()
        self._tail = None
        """The newest segment's file, open for appending; None when a new row begins a new one."""
        self.rows = 0

    def append(self, rows: list[UsageRow]) -> int:
        """Writes the rows that fit within the bound, oldest first; returns how many did not."""
        room = max(0, self._max_rows - self.rows)
        kept = rows[:room]
        while kept:
            if self._tail is None or self._segments[-1].rows >= SEGMENT_ROWS:
                self._begin_segment()
            segment = self._segments[-1]
            part, kept = kept[: SEGMENT_ROWS - segment.rows], kept[SEGMENT_ROWS - segment.rows :]
            try:
                self._tail.write("".join(json.dumps(row.to_json()) + "\n" for row in part))
                self._tail.flush()
            except OSError:
                self._close_tail()  # a line may be torn: the next rows begin a segment of their own
                raise
            segment.rows += len(part)
            self.rows += len(part)
        return len(rows) - min(len(rows), room)

    def oldest(self, max_rows: int = SEGMENT_ROWS) -> list[Segment]:
        """The segments to send next, oldest first: as many as fit in `max_rows` rows, at least
        one. They are closed to appends: rows spilled while they are sent go to a new segment, so
        that deleting them once acknowledged deletes only rows that were sent."""
        picked, rows = [], 0
        for segment in self._segments:
            if picked and rows + segment.rows > max_rows:
                break
            picked.append(segment)
            rows += segment.rows
        if picked and picked[-1] is self._segments[-1]:
            self._close_tail()
        return picked

    def read(self, segment: Segment) -> tuple[list[UsageRow], int]:
        """The segment's rows, and how many of its lines could not be read (a line torn by a crash
        while it was written, or a row of a version this one cannot read), logged at ERROR; both
        told the first time only."""
        first, segment.read = not segment.read, True
        rows, unreadable = [], 0
        try:
            text = segment.path.read_text()
        except FileNotFoundError:
            if first:
                logger.error("usage ledger: %s is gone, with its %d rows", segment.path, segment.rows)
            return [], segment.rows if first else 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rows.append(UsageRow.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                unreadable += 1
                if first:
                    logger.error("usage ledger: an unreadable row in %s, left out: %r", segment.path, line[:2000])
        return rows, unreadable if first else 0

    def remove(self, segment: Segment) -> None:
        """The segment's rows are stored: it goes."""
        if self._segments and self._segments[0] is segment:
            self._segments.popleft()
        else:
            self._segments.remove(segment)
        self.rows -= segment.rows
        segment.path.unlink(missing_ok=True)

    def adopt(self) -> int:
        """Makes the segments of every dead owner in the directory this one's; returns their rows."""
        adopted: list[Segment] = []
        owners = {path.name.split(".", 1)[0] for path in self.directory.glob("*.jsonl")}
        for owner in sorted(owners - {self._owner}):
            lock_path = self.directory / f"{owner}.lock"
            try:
                lock = lock_path.open("a")
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its owner lives
                for path in self.directory.glob(f"{owner}.*.jsonl"):
                    begun_ns = _begun_ns(path)
                    mine = self.directory / f"{self._owner}.{begun_ns:020d}.{uuid.uuid4().hex[:6]}.jsonl"
                    try:
                        path.rename(mine)
                    except FileNotFoundError:
                        continue  # another adopter was first (it held the lock before we opened it)
                    adopted.append(Segment(mine, begun_ns, _count_lines(mine)))
                lock_path.unlink(missing_ok=True)
            finally:
                lock.close()
        if not adopted:
            return 0
        # Older than every segment of ours but the ones begun before them: sorted in by time.
        self._close_tail()
        segments = sorted([*self._segments, *adopted], key=lambda segment: segment.begun_ns)
        self._segments = deque(segments)
        rows = sum(segment.rows for segment in adopted)
        self.rows += rows
        return rows

    def adopt_logged(self) -> int:
        """`adopt`, saying so when there were rows to adopt."""
        adopted = self.adopt()
        if adopted:
            logger.warning("usage ledger: %d rows of a stopped replica found in %s, to send", adopted, self.directory)
        return adopted

    @classmethod
    def opened(cls, directory: Path, max_rows: int) -> "Spill | None":
        """The replica's spill with the rows of stopped replicas adopted, or None (logged) where
        the disk cannot hold rows: they then wait in memory only."""
        try:
            spill = cls(directory, max_rows)
        except OSError as error:
            logger.error(
                "usage ledger: cannot keep rows in %s (%s); rows the ledger cannot store wait in memory only",
                directory,
                error,
            )
            return None
        spill.adopt_logged()
        return spill

    def close(self) -> None:
        """Releases the lock, leaving the segments (if any) for the next owner to adopt."""
        self._close_tail()
        if not self._segments:
            (self.directory / f"{self._owner}.lock").unlink(missing_ok=True)
        self._lock.close()

    def _begin_segment(self) -> None:
        self._close_tail()
        begun_ns = time.time_ns()
        if self._segments and begun_ns <= self._segments[-1].begun_ns:
            begun_ns = self._segments[-1].begun_ns + 1
        path = self.directory / f"{self._owner}.{begun_ns:020d}.jsonl"
        self._tail = path.open("a")
        self._segments.append(Segment(path, begun_ns, 0))

    def _close_tail(self) -> None:
        if self._tail is not None:
            self._tail.close()
            self._tail = None


def _begun_ns(path: Path) -> int:
    try:
        return int(path.name.split(".")[1])
    except (IndexError, ValueError):
        return 0


def _count_lines(path: Path) -> int:
    with path.open("rb") as file:
        return sum(1 for line in file if line.strip())
