"""How the real engine's processes run under Ray: at the host's normal priority, as bare vLLM's do."""

import contextlib

import psutil
import pytest

pytestmark = pytest.mark.e2e

REPLICA = "ray::ServeReplica"


def _kind(process: psutil.Process) -> str:
    title = " ".join(process.cmdline()).strip()
    return REPLICA if title.startswith(REPLICA + ":") else title


def test_the_engine_and_the_replicas_run_at_normal_priority(llm_url):
    """Ray starts its workers at nice 15, behind its own daemons and everything else on the host;
    vLLM's scheduler loop there waited behind them on every token (`RAY_worker_niceness`, in
    cluster/runtime.py). This session's Ray node was started by this process, so its workers and
    their engines are this process's descendants, whatever else runs on the host."""
    niceness: dict[str, set[int]] = {}
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            kind = _kind(process)
            if kind == REPLICA or kind.startswith("VLLM::"):
                niceness.setdefault(kind, set()).add(process.nice())
    assert {"VLLM::EngineCore", "VLLM::Worker", REPLICA} <= set(niceness)
    assert niceness == {key: {0} for key in niceness}
