"""The routing benchmark's own logic, without Ray: its workload, and the hit rates it reads from
vLLM's counters as Ray's Prometheus endpoint exports them."""

import math

import pytest

from bench import report, routing

QUERIES = "ray_vllm_prefix_cache_queries_total"
HITS = "ray_vllm_prefix_cache_hits_total"


def _sample(name: str, replica: str, value: float, engine: str = "0") -> tuple[tuple[str, frozenset], float]:
    labels = frozenset({"ReplicaId": replica, "engine": engine, "model_name": "m", "Component": "core_worker"}.items())
    return (name, labels), value


def test_conversations_share_the_system_prompt_and_nothing_else():
    turns = routing.user_turns(12, 6)
    assert len(turns) == 12 and all(len(t) == 6 for t in turns)
    assert len({t[0] for t in turns}) == 12  # each conversation differs from its first user message on
    assert routing.system_prompt(15) == routing.system_prompt(15)  # runs compare
    with pytest.raises(ValueError):
        routing.user_turns(2, len(routing.FOLLOW_UPS) + 1)


def test_turns_are_interleaved_round_by_round():
    assert routing.interleaved(3, 2) == [[0, 1, 2], [0, 1, 2]]


def test_a_run_counts_each_replicas_delta_and_the_overall_rate_is_weighted_by_tokens():
    before = dict([_sample(QUERIES, "a", 100), _sample(HITS, "a", 10), _sample(QUERIES, "old", 50)])
    after = dict(
        [
            _sample(QUERIES, "a", 1100),
            _sample(HITS, "a", 810),
            _sample(QUERIES, "b", 100),  # absent before: counted from zero
            _sample(HITS, "b", 0),
            _sample(QUERIES, "old", 50),
            _sample("ray_vllm_external_prefix_cache_queries_total", "a", 999),  # another counter
        ]
    )
    figures = routing.cache_deltas(before, after, ["a", "b"])
    assert figures == {
        "a": routing.CacheFigures(queries=1000, hits=800),
        "b": routing.CacheFigures(queries=100, hits=0),
    }
    total = routing.overall(figures)
    assert (total.queries, total.hits) == (1100, 800)
    assert total.hit_rate == pytest.approx(800 / 1100)  # not the mean of 80 % and 0 %


def test_a_replica_with_several_engines_sums_them_and_one_without_queries_has_no_rate():
    samples = dict([_sample(QUERIES, "a", 10, engine="0"), _sample(QUERIES, "a", 5, engine="1")])
    assert routing.per_replica(samples, routing.QUERIES) == {"a": 15}
    assert math.isnan(routing.CacheFigures(queries=0, hits=0).hit_rate)


def test_a_runs_replicas_are_those_no_earlier_run_showed_and_a_silent_one_still_shows():
    samples = dict([_sample(QUERIES, "old", 5), _sample(QUERIES, "new", 5)])
    assert routing.new_replicas(samples, {"old"}, expected=2) == ["new", "(replica 2: no requests)"]


def test_the_table_sets_each_run_against_the_one_replica_bound():
    def run(name: str, replicas: int, hits: float) -> routing.RunResult:
        figures = {f"r{i}": routing.CacheFigures(queries=500, hits=hits / replicas) for i in range(replicas)}
        return routing.RunResult(name, replicas, 30.0, 60.0, 4, 0, [0.1, 0.2, 0.3, 0.4], figures, 400)

    table = routing.markdown([run("default", 2, 400), run("one replica", 1, 400)], {})
    rows = [line for line in table.splitlines() if line.startswith("| default") or line.startswith("| one")]
    # 400 of 1000 tokens, half the bound's 80 %, 600 prefilled
    assert "| 40.0% | 50% | 600 |" in rows[0]
    assert "| 80.0% | 100% | 100 |" in rows[1]
    idle = run("prefix_cache", 2, 400)
    idle.per_replica["r1"] = routing.CacheFigures(queries=0, hits=0)
    assert "no requests" in routing.markdown([idle], {})


def test_the_section_is_rewritten_between_its_own_markers_only():
    page = f"a\n{report.BEGIN}\nbench\n{report.END}\n{routing.BEGIN}\nold\n{routing.END}\nz\n"
    page = report.marked_section(page, routing.docs_section("| new |\n"), routing.BEGIN, routing.END)
    assert "old" not in page and "| new |" in page and "\nbench\n" in page and page.endswith("\nz\n")
    with pytest.raises(ValueError):
        report.marked_section("no markers", "", routing.BEGIN, routing.END)
