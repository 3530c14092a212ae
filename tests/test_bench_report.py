"""The benchmark's arithmetic: turns pooled into one figure, and each contender set against the bare
vLLM it was measured in turns with, not the one measured beside another contender."""

from bench.load import LoadResult, Samples
from bench.report import markdown

META = {"model": "m", "input_len": 8, "output_len": 10, "machine": "x", "layout": "y", "started_in_s": {}}


def _samples(ttfts: list[float], tokens: int, elapsed_s: float) -> Samples:
    return Samples(ttfts=ttfts, itls=[0.05] * tokens, tokens=tokens, requests=len(ttfts), elapsed_s=elapsed_s)


def test_turns_pool_their_timings_and_durations():
    pooled = Samples()
    pooled += _samples([0.1, 0.3], tokens=20, elapsed_s=2.0)
    pooled += _samples([0.2], tokens=10, elapsed_s=4.0)
    result = LoadResult.of("ours", "/llm", 1, pooled)
    assert (result.requests, result.output_tokens_per_s, result.ttft_p50_ms) == (3, 5.0, 200.0)


def test_each_contender_is_compared_with_its_own_turns_of_bare_vllm():
    api = "/v1 (vllm bench)"
    results = [
        LoadResult.of("bare vLLM", api, 1, _samples([0.2], 10, 1.0), compared_with="ours"),
        LoadResult.of("ours", api, 1, _samples([0.25], 10, 2.0)),
        LoadResult.of("bare vLLM", api, 1, _samples([0.1], 10, 0.5), compared_with="Ray Serve LLM"),
        LoadResult.of("Ray Serve LLM", api, 1, _samples([0.1], 10, 0.5)),
    ]
    rows = {line.split(" | ")[1]: line for line in markdown(results, [], META).splitlines() if line.startswith("| /v1")}
    assert rows["ours"].endswith("| 0.500× | +50.0 ms |")
    assert rows["Ray Serve LLM"].endswith("| 1.000× | +0.0 ms |")
    assert rows["bare vLLM (in turns with ours)"].endswith("|  |  |")


def test_llm_is_compared_with_bare_vllm_under_the_same_client():
    results = [
        LoadResult.of(
            "bare vLLM", "/v1/chat/completions, 1-token answers", 1, _samples([0.1], 1, 1.0), compared_with="ours"
        ),
        LoadResult.of("ours", "/llm, 1-token answers", 1, _samples([0.12], 1, 1.0)),
    ]
    [ours] = [line for line in markdown(results, [], META).splitlines() if line.startswith("| /llm")]
    assert ours.endswith("| – | 0 |  | +20.0 ms |")  # no inter-token latency, no token rate to compare


def test_first_tokens_rotate_blocks_drop_warm_ups_and_count_failures(monkeypatch):
    import bench.load
    from bench.systems import Running

    runs = [(Running(name, "http://x", "m", None, 0.0), "/r") for name in ("a", "b")]
    calls: list[str] = []

    def first_token_s(client, run, route):
        calls.append(run.name)
        n = calls.count(run.name)
        return None if n == 5 else n / 10  # each system's 5th request fails

    monkeypatch.setattr(bench.load, "_first_token_s", first_token_s)
    samples = bench.load.first_tokens(runs, blocks=2, block=3, dropped=1)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    a = samples["a", "/r"]
    assert (a.ttfts, a.requests, a.errors, a.tokens) == ([0.2, 0.3, 0.6], 4, 1, 3)
    b = samples["b", "/r"]
    assert (b.ttfts, b.requests, b.errors) == ([0.2, 0.3, 0.6], 4, 1)
