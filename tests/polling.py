"""Waiting for an event the test cannot be told about, only observe: bounded polling."""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(condition: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.1) -> T:
    """Returns the condition's first truthy value; fails naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)
    return value
