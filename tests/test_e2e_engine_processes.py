"""How the real engine's processes run under Ray: at the host's normal priority, as bare vLLM's do."""

import psutil
import pytest

pytestmark = pytest.mark.e2e

REPLICA = "ray::ServeReplica"


def test_the_engine_and_the_replicas_run_at_normal_priority(llm_url):
    """Ray starts its workers at nice 15, behind its own daemons and everything else on the host;
    vLLM's scheduler loop there waited behind them on every token (`RAY_worker_niceness`, in
    cluster/runtime.py)."""
    niceness: dict[str, set[int]] = {}
    for process in psutil.process_iter(["cmdline", "nice"]):
        title = " ".join(process.info["cmdline"] or []).strip()
        kind = REPLICA if title.startswith(REPLICA + ":") else title
        if kind == REPLICA or kind.startswith("VLLM::"):
            niceness.setdefault(kind, set()).add(process.info["nice"])
    assert {"VLLM::EngineCore", "VLLM::Worker", REPLICA} <= set(niceness)
    assert niceness == dict.fromkeys(niceness, {0})
