"""The ingress's client of the usage ledger (`ledger.py`): a batch is the client's until the
ledger has answered that it is stored; until then it is sent again, and while the ledger fails
the rows wait on the ingress replica's disk (`spill.py`).
"""

import asyncio
import contextlib
import contextvars
import logging
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.schema import UsageSettings
from serve_app.telemetry.metrics import LedgerMetrics
from serve_app.telemetry.record import FinishedRequest
from serve_app.tenancy import detached
from serve_app.tenancy.spill import Spill
from serve_app.tenancy.usage_store import DEFAULT_GROUPS, UsageRow

logger = logging.getLogger("ray.serve")

BATCH_ROWS = 5000
"""The most rows in one call to the ledger."""
CALL_TIMEOUT_S = 30.0
"""A call the ledger has not answered by then counts as failed and is made again (the first may
still be stored: the second then stores nothing twice)."""
FIRST_RETRY_S = 0.5
ADOPT_EVERY_S = 5.0
"""How often a client looks for the rows of dead replicas on its node's disk."""
SETTLE_S = 10.0
"""How long `/admin/usage` waits for the answering replica's rows to be stored before it reads."""
CLOSE_WITHIN_S = 10.0
"""How long a stopping replica keeps trying to store its rows; what is left then waits on disk."""


class LedgerClient:
    """The ingress's side, a listener of finished requests. A request's row (unless it never
    reached an engine) waits here up to `flush_interval_s` and goes with the others of that time
    in one call: a handle call per row costs the replica that relays tokens more than the row is
    worth (`python -m bench.ledger_flush` measures it, docs/benchmarks.md has the figures).

    One sender task makes the calls, one at a time, oldest rows first: a batch leaves only when
    the ledger acknowledges it. A call that fails (the ledger's replica dead or restarting, the
    database unwritable) puts its rows and every later one on disk until a call succeeds again;
    the sender retries with a backoff doubling to `retry_max_s`. A replica that stops gracefully
    stores its rows, or leaves them on disk; one that crashes loses the rows it held in memory
    (at most its last interval's and the call in flight), never those on disk."""

    def __init__(
        self,
        ledger: DeploymentHandle | None,
        settings: UsageSettings | float,
        metrics: LedgerMetrics | None = None,
    ) -> None:
        if not isinstance(settings, UsageSettings):  # a flush interval alone: the other settings' defaults
            settings = UsageSettings(flush_interval_s=settings)
        self._ledger = ledger
        self._flush_interval_s = settings.flush_interval_s
        self._retry_max_s = settings.retry_max_s
        self._max_rows = settings.spill_max_rows
        self._held: list[UsageRow] = []
        """Rows of the current interval."""
        self._queue: list[UsageRow] = []
        """Rows flushed, for the sender to send (from memory)."""
        self._in_flight: list[UsageRow] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sender: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._failures = 0
        """Consecutive failed calls: rows go to disk while there are any."""
        self._last_error = ""
        self._metrics = metrics
        self._spill: Spill | None = None
        if ledger is None:
            return
        self._metrics = metrics or LedgerMetrics(_replica_name())
        folder = Path(settings.spill_directory).expanduser() / _spill_name(ledger)
        self._spill = Spill.opened(folder, settings.spill_max_rows)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the first row
        self._start()
        self._report()

    @property
    def enabled(self) -> bool:
        return self._ledger is not None

    @property
    def pending(self) -> int:
        """Rows this replica holds that the ledger has not acknowledged, in memory or on disk."""
        on_disk = self._spill.rows if self._spill is not None else 0
        return len(self._held) + len(self._queue) + len(self._in_flight) + on_disk

    def record(self, request: FinishedRequest) -> None:
        if self._ledger is None or not request.reached_engine:
            return
        self._held.append(UsageRow.of(request))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_interval_s, self.flush)

    def flush(self) -> None:
        """The interval's rows go to the sender: to disk at once while the ledger fails."""
        rows = self._take()
        if not rows:
            return
        if self._failures and self._spill is not None and not self._closing.is_set():
            self._park(rows)
        else:
            self._queue.extend(rows)
            self._bound_memory()
        self._start()
        self._wake.set()
        self._report()

    async def close(self) -> None:
        """For a replica about to stop: stores the rows it holds, trying for up to
        `CLOSE_WITHIN_S`; what is not stored by then is left on disk for the next replica."""
        if self._ledger is None:
            return
        self.flush()
        await self._settled(CLOSE_WITHIN_S, memory_only=True)
        self._closing.set()
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        left = self._in_flight + self._queue
        self._in_flight, self._queue = [], []
        if left and self._spill is None:
            self._lost(len(left), "the replica stops, the ledger has not stored them and there is no disk to keep them")
        elif left:
            self._park(left)
        if self._spill is not None:
            if self._spill.rows:
                logger.warning(
                    "usage ledger: stopping with %d rows not yet stored, left in %s for the next replica on this node",
                    self._spill.rows,
                    self._spill.directory,
                )
            self._spill.close()
        self._report()

    async def totals(
        self,
        since: float | None,
        until: float | None,
        key: str | None,
        model: str | None,
        group_by: Sequence[str] = DEFAULT_GROUPS,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """The rows this replica holds are counted too: they are stored first, unless the ledger
        fails them (then it fails this too, most likely). Those other ingress replicas hold are
        not, until their next flush."""
        self.flush()
        await self._settled(SETTLE_S)
        return await self._ledger.totals.remote(since, until, key, model, tuple(group_by), tenant)

    async def _settled(self, within_s: float, memory_only: bool = False) -> None:
        """Waits until every row (or every row in memory) is stored, the ledger fails, or time is up."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline and not (self._failures and not memory_only):
            waiting = len(self._queue) + len(self._in_flight)
            if not memory_only and self._spill is not None:
                waiting += self._spill.rows
            if not waiting or self._sender is None or self._sender.done():
                return
            await asyncio.sleep(0.01)

    def _start(self) -> None:
        """The sender runs outside any request's context: a handle call made in one would be that
        request's child, cancelled when its client leaves."""
        if self._ledger is None or self._closing.is_set():
            return
        if self._sender is None or self._sender.done():
            loop = asyncio.get_running_loop()
            self._sender = loop.create_task(self._send_all(), context=contextvars.Context())

    async def _send_all(self) -> None:
        last_adopt = time.monotonic()
        while not self._closing.is_set():
            if self._spill is not None and time.monotonic() - last_adopt >= ADOPT_EVERY_S:
                last_adopt = time.monotonic()
                if self._spill.adopt_logged():
                    self._report()
            try:
                sent = await self._send_next()
            except Exception:  # a bug, or a disk that fails: logged, and tried again
                logger.exception("usage ledger: sending rows failed unexpectedly")
                self._failures += 1
                self._last_error = "see the error above"
                sent = False
            if not sent:
                delay = min(self._retry_max_s, FIRST_RETRY_S * 2 ** min(self._failures - 1, 20))
                delay *= random.uniform(0.8, 1.0)  # replicas that failed together retry apart
                logger.warning(
                    "usage ledger: storing rows failed (%s); %d rows wait (%s); retrying in %.1f s",
                    self._last_error,
                    self.pending,
                    f"{self._spill.rows} on disk in {self._spill.directory}" if self._spill is not None else "no disk",
                    delay,
                )
                await _wait(self._closing, delay)
                continue
            if not (self._queue or (self._spill is not None and self._spill.rows)):
                self._wake.clear()
                await _wait(self._wake, ADOPT_EVERY_S)

    async def _send_next(self) -> bool:
        """Sends the oldest rows waiting, disk first; False if the ledger did not store them."""
        segments = self._spill.oldest(BATCH_ROWS) if self._spill is not None else []
        if segments:
            rows = []
            for segment in segments:
                read, unreadable = self._spill.read(segment)
                self._lost(unreadable, f"unreadable in {segment.path}")
                rows += read
            if rows and not await self._deliver(rows):
                return False
            for segment in segments:
                self._spill.remove(segment)
            if not self._spill.rows:
                logger.info("usage ledger: every row kept on disk is stored")
            self._report()
            return True
        if not self._queue:
            return True
        self._in_flight, self._queue = self._queue[:BATCH_ROWS], self._queue[BATCH_ROWS:]
        try:
            stored = await self._deliver(self._in_flight)
        except asyncio.CancelledError:
            self._queue[:0] = self._in_flight  # stopping: `close` keeps them
            self._in_flight = []
            raise
        rows, self._in_flight = self._in_flight, []
        if not stored:
            # These and every row after them wait on disk (in memory if there is no disk), so
            # that a replica that dies while the ledger fails loses none of them.
            self._queue[:0] = rows
            if self._spill is not None:
                rows, self._queue = self._queue, []
                self._park(rows)
        self._report()
        return stored

    async def _deliver(self, rows: list[UsageRow]) -> bool:
        try:
            await asyncio.wait_for(detached.call(self._ledger, "add", rows), CALL_TIMEOUT_S)
        except Exception as error:
            self._failures += 1
            self._last_error = _brief(error)
            self._metrics.failed()
            return False
        if self._failures:
            logger.warning(
                "usage ledger: rows are stored again, after %d failed attempts; %d rows wait",
                self._failures,
                self.pending - len(rows),
            )
            self._failures = 0
        return True

    def _park(self, rows: list[UsageRow]) -> None:
        """Rows to disk, or, without one, back in memory; past the bound, dropped loudly."""
        if self._spill is None:
            self._queue.extend(rows)
            self._bound_memory()
            return
        try:
            dropped = self._spill.append(rows)
        except OSError as error:
            logger.error(
                "usage ledger: cannot write rows to %s (%s); keeping them in memory", self._spill.directory, error
            )
            self._queue.extend(rows)
            self._bound_memory()
            return
        self._lost(dropped, f"{self._spill.directory} holds usage.spill_max_rows ({self._max_rows}) already")

    def _bound_memory(self) -> None:
        room = max(0, self._max_rows - self.pending + len(self._queue))
        if len(self._queue) > room:
            dropped = len(self._queue) - room
            del self._queue[room:]
            self._lost(dropped, f"usage.spill_max_rows ({self._max_rows}) rows already wait in memory")

    def _lost(self, rows: int, why: str) -> None:
        if rows:
            self._metrics.lost(rows)
            logger.error("usage ledger: %d rows dropped, never to be stored: %s", rows, why)

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.waiting(self.pending)

    def _take(self) -> list[UsageRow]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, self._held = self._held, []
        return rows


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


def _spill_name(ledger: DeploymentHandle) -> str:
    """The folder of an application's rows: they are sent only to that application's ledger."""
    name = getattr(ledger, "app_name", None)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name) if isinstance(name, str) and name else "default"
    return name if name.strip(".") else "default"


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "-"


def _brief(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:500]
