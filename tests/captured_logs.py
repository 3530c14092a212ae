"""The records of the `ray.serve` logger, counted once each. Whether that logger propagates to
the root logger (where caplog listens) depends on how Ray's logging was set up in the process,
so the records are taken at the logger itself."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno >= level]


@contextmanager
def serve_records() -> Iterator[Records]:
    logger = logging.getLogger("ray.serve")
    records = Records()
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)
