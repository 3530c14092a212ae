"""Finding a request's line in the Serve replica logs of this session's Ray node."""

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import ray

from tests.polling import until


def log_line(request_id: str, app: str = "llm", timeout_s: float = 15) -> str:
    """The request's line in the app's ingress replica logs (its model's deployment's when
    colocated), once it has been written."""
    return _find(request_id, app, timeout_s)[1]


def replica_of(request_id: str, app: str, timeout_s: float = 15) -> str:
    """The name of the ingress replica log that holds the request's line: which replica served it."""
    return _find(request_id, app, timeout_s)[0]


def lines_of(request_id: str, app: str) -> list[str]:
    """Every line naming the request in the app's replica logs (any deployment), as of now."""
    return [line for _, line in _lines(app) if request_id in line]


def fields_of(line: str) -> dict[str, str]:
    """The `name=value` fields of a request's log line, after Serve's prefix."""
    return dict(re.findall(r"(\w+)=(\S+)", line.split(" -- ", 1)[1]))


def errors_since(app: str, since: datetime) -> list[str]:
    """The ERROR lines of the app's replica logs written at or after `since` (Serve's log lines
    start with their level and local time; a traceback is written on one line after its own)."""
    found = []
    for _, line in _lines(app):
        level, _, rest = line.partition(" ")
        if level == "ERROR" and datetime.strptime(rest[:23], "%Y-%m-%d %H:%M:%S,%f") >= since:
            found.append(line)
    return found


def _lines(app: str) -> Iterator[tuple[str, str]]:
    """(log file name, line) for every line of the app's replica logs."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    for path in logs.glob(f"replica_{app}_*.log"):
        for line in path.read_text().splitlines():
            yield path.name, line


def _find(request_id: str, app: str, timeout_s: float) -> tuple[str, str]:
    def scan() -> tuple[str, str] | None:
        return next(((name, line) for name, line in _lines(app) if f"request id={request_id} " in line), None)

    return until(scan, timeout_s, f"the log line of request {request_id}")


def log_line_under(logs: Path, request_id: str, app: str = "llm", timeout_s: float = 15) -> str:
    """The request's line in the app's replica logs under `logs` (a Ray node's logs/serve/): for
    a server this session did not start, whose logs the session's node does not know."""

    def scan() -> str | None:
        lines = (line for path in logs.glob(f"replica_{app}_*.log") for line in path.read_text().splitlines())
        return next((line for line in lines if f"request id={request_id} " in line), None)

    return until(scan, timeout_s, f"the log line of request {request_id}")
