"""The server as an operator runs it (`python -m cluster serve`, its own Ray cluster), on the real
model, through two faults and a stop: the engine process of the replica killed under two streams
(they end well-formed, are recorded as failed, and the replica is replaced through its health
check), then the replica's own worker process killed and the server stopped with Ctrl-C while
Serve starts the replacement. After the stop, no process of the server's is left on the host."""

import asyncio
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import ROOT
from tests.polling import until
from tests.processes import MARKER, Seen, alive, described, free_port, kill_all, marked, record
from tests.serve_logs import fields_of, log_line_under
from tests.sse import events, json_chunks

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
ENGINE = "VLLM::EngineCore"
# What a caller must never read: Python's, Ray's and vLLM's insides.
INTERNALS = ("traceback", 'file "', "enginedead", "enginecore", "vllm", "ray::", "rayactorerror", "site-packages")
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0, "stream": True}
PROMPT = [{"role": "user", "content": "Tell a long story."}]


def _config(folder: Path, port: int) -> Path:
    """configs/local.yaml on a free port, in eager mode (no compile warm-up: the engine starts
    sooner), checked every second and stopped without waiting for streams, its ledger here."""
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]["args"]
    app["usage"] = {"database": f"sqlite:///{folder / 'usage.sqlite'}"}
    model = app["models"][0]
    model["engine"]["enforce_eager"] = True
    model["deployment"] |= {"health_check_period_s": 1, "health_check_timeout_s": 10, "graceful_shutdown_timeout_s": 1}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(folder: Path, marker: str, key: str) -> tuple[subprocess.Popen, int]:
    """`python -m cluster serve` in a session of its own, as `make serve &` in a script starts it:
    with SIGINT ignored on entry (as a shell without job control starts a background job), which
    it must undo for `serve run`; a terminal's start, with the default, is the easier case. Its
    Ray cluster is its own: no address of this session's cluster, and its own temp dir (sockets,
    logs, the file by which `ray.init` finds a running cluster)."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    env |= {MARKER: marker, "LLM_API_KEY": key, "RAY_TMPDIR": str(folder), "PYTHONUNBUFFERED": "1"}
    serve = [sys.executable, "-m", "cluster", "serve", str(_config(folder, port))]
    server = subprocess.Popen(
        ["bash", "-c", 'trap "" INT && exec "$@"', "bash", *serve],
        cwd=ROOT,
        env=env,
        stdout=(folder / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return server, port


def _descendants(server: subprocess.Popen) -> list[psutil.Process]:
    with suppress(psutil.NoSuchProcess):
        return [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    return []


def _engines(server: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for process in _descendants(server):
        with suppress(psutil.Error):
            if (process.cmdline() or [""])[0].startswith(ENGINE):
                found.append(process)
    return found


def _left(seen: Seen, marker: str) -> dict[int, str]:
    """The processes of the server still running, by pid: those seen, and any with its marker."""
    return described([*alive(seen), *(process.pid for process in marked(marker))])


def _ready(server: subprocess.Popen, url: str) -> bool:
    assert server.poll() is None, "the server exited"
    with suppress(httpx.HTTPError):
        response = httpx.get(url + "/health", timeout=5)  # Serve's proxy answers 404 before the app is up
        return response.status_code == 200 and response.json()["status"] == "OK"
    return False


def _answers(client: httpx.Client, refusals: list[httpx.Response]) -> bool:
    """Whether the model answers; a refusal is kept, to be checked."""
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8}
    with suppress(httpx.HTTPError):
        response = client.post("/llm", json=body, timeout=30)
        if response.status_code != 200:
            refusals.append(response)
        return response.status_code == 200
    return False


async def _stream(client: httpx.AsyncClient, path: str, body: dict, request_id: str, started: asyncio.Event) -> str:
    """The whole body of a stream; `started` is set at its first event."""
    text = ""
    async with client.stream("POST", path, json=body, headers={"x-request-id": request_id}) as response:
        assert response.status_code == 200
        async for piece in response.aiter_text():
            text += piece
            if "data: " in text:
                started.set()
    return text


async def _kill_engine_under_streams(url: str, key: str, engine: psutil.Process) -> tuple[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        started = [asyncio.Event(), asyncio.Event()]
        v1 = {"model": MODEL, "messages": PROMPT} | LONG
        streams = [
            asyncio.create_task(_stream(client, "/llm", {"messages": PROMPT} | LONG, "fault-llm", started[0])),
            asyncio.create_task(_stream(client, "/v1/chat/completions", v1, "fault-v1", started[1])),
        ]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 120)
        assert not any(stream.done() for stream in streams), "a stream ended before the engine was killed"
        engine.kill()
        llm_body, v1_body = await asyncio.wait_for(asyncio.gather(*streams), 120)
    return llm_body, v1_body


def _stacks(server: subprocess.Popen) -> str:
    """The Python stacks of the server's processes still running (py-spy), for a stop that hangs;
    within a minute in all, and whatever py-spy cannot read (a C++ daemon, a process gone, ptrace
    refused) said in a line, so that the test's own failure message is what is reported."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return "(py-spy is not installed)"
    dumps, deadline = [], time.monotonic() + 60
    for process in _descendants(server):
        if time.monotonic() > deadline:
            break
        with suppress(psutil.Error, OSError, subprocess.SubprocessError):
            name = " ".join(process.cmdline())[:120]
            dump = subprocess.run([spy, "dump", "--pid", str(process.pid)], capture_output=True, text=True, timeout=10)
            dumps.append(f"--- {process.pid} {name}\n{dump.stdout[-4000:]}{dump.stderr[-300:]}")
    return "\n".join(dumps)


def _signals(pid: int) -> str:
    """How a process takes signals, for a stop that hangs: the kernel's masks for it
    (pending, blocked in the main thread, ignored, caught), by /proc/<pid>/status."""
    with suppress(OSError):
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return " ".join(line for line in lines if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")))
    return f"(pid {pid} is gone)"


def _internals(text: str) -> list[str]:
    return [word for word in INTERNALS if word in text.lower()]


def _ledger_statuses(database: Path) -> dict[str, int]:
    with sqlite3.connect(database) as db:
        rows = db.execute("select request_id, status from usage where request_id like 'fault-%'").fetchall()
    return dict(rows)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short path: Ray's socket paths under its temp dir must fit in a Unix socket's 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="llm-fault-") as folder:
        yield Path(folder)


def test_a_killed_engine_fails_its_streams_cleanly_and_a_stop_leaves_no_process_behind(scratch):
    marker, key = secrets.token_hex(8), "sk-fault-" + secrets.token_hex(8)
    server, port = _start(scratch, marker, key)
    url = f"http://127.0.0.1:{port}"
    seen: Seen = set()
    try:
        until(lambda: _ready(server, url), 600, "the server to be ready", every_s=1)
        [engine] = _engines(server)
        first_replica = engine.ppid()
        record(_descendants(server), seen)

        # 1. The engine process killed under a /llm and a /v1 stream.
        llm, v1 = asyncio.run(_kill_engine_under_streams(url, key, engine))
        killed_at = time.monotonic()
        last = json_chunks(llm)[-1]
        assert last["choices"][0]["finish_reason"] and last["error"]["message"], last
        v1_events = events(v1)
        assert v1_events[-1] == "[DONE]" and '"error"' in v1_events[-2], v1_events[-3:]
        # Checked last, so that a leak of words does not hide how the processes end.
        shown = {"/llm": (_internals(llm), llm[-600:]), "/v1": (_internals(v1), v1[-600:])}
        logs = scratch / "ray" / "session_latest" / "logs" / "serve"
        for request_id in ("fault-llm", "fault-v1"):
            assert int(fields_of(log_line_under(logs, request_id))["status"]) >= 500
        statuses = until(
            lambda: len(rows := _ledger_statuses(scratch / "usage.sqlite")) == 2 and rows, 30, "the streams' rows"
        )
        assert all(status >= 500 for status in statuses.values()), statuses

        # Serve's health check finds the engine dead and replaces the replica.
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
            refusals: list[httpx.Response] = []
            until(lambda: _answers(client, refusals), 600, "the model to answer again", every_s=0.5)
        print(f"\nengine killed mid-stream: the model answered again {time.monotonic() - killed_at:.1f} s later")
        # Meanwhile, a request is told to retry in /llm's shape, never given a 500.
        print(f"refused meanwhile: {[(r.status_code, r.text[:200]) for r in refusals]}")
        for refusal in refusals:
            assert refusal.status_code == 503 and refusal.headers.get("retry-after"), refusal.text
            assert "retry" in refusal.json()["detail"]["msg"], refusal.text

        # 2. The new replica's worker process killed, and the server stopped as Ctrl-C does while
        # Serve starts the replacement (its engine among the processes then).
        [engine] = _engines(server)
        assert engine.ppid() != first_replica, "the replica kept its worker: it was not replaced"
        record(_descendants(server), seen)
        replaced: Seen = {(p.pid, p.create_time()) for p in [engine, *engine.children(recursive=True)]}
        engine.parent().kill()
        # Gone before the replacement's engine loads: on a GPU, it would want their memory.
        until(lambda: not alive(replaced), 30, "the killed replica's engine processes to exit")
        until(lambda: [e for e in _engines(server) if e.pid != engine.pid], 300, "the replacement's engine")
        record(_descendants(server), seen)
        os.killpg(server.pid, signal.SIGINT)
        stopping = time.monotonic()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the server did not stop within 120 s of Ctrl-C; how it takes signals:\n{_signals(server.pid)}\n"
                f"where it waits:\n{_stacks(server)}"
            )
        print(f"stopped by Ctrl-C in {time.monotonic() - stopping:.1f} s")
        try:
            until(lambda: not _left(seen, marker), 30, "every process of the server to exit")
        except AssertionError:
            pytest.fail(f"left running after the stop: {_left(seen, marker)}")
        assert not any(words for words, _ in shown.values()), shown
    finally:
        kill_all([*_descendants(server), *marked(marker)])
        with suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        print((scratch / "serve.log").read_text()[-3000:])
