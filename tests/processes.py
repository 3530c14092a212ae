"""Finding the processes a test started on this host, and proving they are gone: a test sets a
random marker in the environment of what it starts (every process of a Ray node inherits it from
the raylet, a replica's vLLM engine from the replica) and touches nothing without it."""

import socket
from contextlib import suppress

import psutil

MARKER = "LLM_SERVE_TEST_MARKER"
ENGINE = "VLLM::"
"""The start of a vLLM engine process's title: `VLLM::EngineCore`, `VLLM::Worker`."""

Seen = set[tuple[int, float]]
"""Processes by pid and start time: a pid the host reuses is not taken for one of ours."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked(marker: str) -> list[psutil.Process]:
    """Every process on the host with the marker in its environment (others' are unreadable)."""
    found = []
    for process in psutil.process_iter():
        with suppress(psutil.Error):
            if process.environ().get(MARKER) == marker and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
    return found


def is_engine(process: psutil.Process) -> bool:
    with suppress(psutil.Error):
        return (process.cmdline() or [""])[0].startswith(ENGINE)
    return False


def record(processes: list[psutil.Process], seen: Seen) -> None:
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            seen.add((process.pid, process.create_time()))


def alive(seen: Seen) -> list[int]:
    left = []
    for pid, started in seen:
        with suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
    return left


def described(pids: list[int]) -> dict[int, str]:
    """What each process is, for a failure's message."""
    found = {}
    for pid in pids:
        with suppress(psutil.Error):
            found[pid] = " ".join(psutil.Process(pid).cmdline())[:80]
    return found


def kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.kill()
