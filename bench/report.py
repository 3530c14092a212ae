"""Writing a run's figures: raw JSON, a Markdown table with ours/bare ratios, and a plot; and the
same table, with a link to the plot, into the marked section of docs/benchmarks.md."""

import json
import os
from pathlib import Path

from bench.load import FIRST_TOKEN, LoadResult

BASELINE = "bare vLLM"
DOCS = Path("docs/benchmarks.md")
BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


def write(
    results: list[LoadResult], overhead: list[LoadResult], meta: dict, out: Path, docs: Path | None = None
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    raw = {"meta": meta, "results": [r.as_dict() for r in results], "overhead": [r.as_dict() for r in overhead]}
    (out / "latest.json").write_text(json.dumps(raw, indent=2))
    table = markdown(results, overhead, meta)
    (out / "latest.md").write_text(table)
    plot(results, out / "latest.png")
    if docs is not None:
        update_docs(docs, table, out / "latest.png")
    return table


def save(result: dict, path: Path, show: bool = True) -> None:
    """A focused benchmark's figures: printed (unless it printed its own table), and kept as JSON."""
    if show:
        print(json.dumps(result, indent=2))
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def check_docs(docs: Path) -> None:
    """Before a run, not after it: a page without its markers would fail the run's last step."""
    with_section(docs.read_text(), "")


def update_docs(docs: Path, table: str, plot_path: Path) -> None:
    docs.write_text(with_section(docs.read_text(), docs_section(table, plot_path, docs)))


def docs_section(table: str, plot_path: Path, docs: Path) -> str:
    """The run's table and its plot, linked relative to the page so that it shows where the page
    is read (a repository browser, a checkout)."""
    link = Path(os.path.relpath(plot_path, docs.parent)).as_posix()
    return (
        f"{BEGIN}\n<!-- Written by `make bench` (bench/report.py): edit outside the markers. -->\n\n"
        f"{table}\n![TTFT and throughput against concurrency]({link})\n{END}"
    )


def with_section(page: str, section: str) -> str:
    """`page` with everything from its begin marker to its end marker replaced by `section`."""
    begin, end = page.find(BEGIN), page.find(END)
    if begin < 0 or end < begin or page.count(BEGIN) != 1 or page.count(END) != 1:
        raise ValueError(f"the page needs one {BEGIN} and, after it, one {END} around the section make bench writes")
    return page[:begin] + section + page[end + len(END) :]


def markdown(results: list[LoadResult], overhead: list[LoadResult], meta: dict) -> str:
    lines = [
        f"Model `{meta['model']}`, {meta['input_len']}-token prompts, {meta['output_len']} output tokens, "
        f"greedy; {meta['machine']}; {meta['layout']}; each contender measured in turns with bare vLLM "
        "(bare, it, it, bare at each concurrency), the turns pooled. Start-up to first answer: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in meta["started_in_s"].items())
        + ".",
        "",
        "| load | system | conc. | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors | tok/s vs bare | TTFT p50 vs bare |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = _baseline(results, r)
        one_token = FIRST_TOKEN in r.api
        ratio = f"{r.output_tokens_per_s / base.output_tokens_per_s:.3f}×" if base and not one_token else ""
        delta = f"{r.ttft_p50_ms - base.ttft_p50_ms:+.1f} ms" if base else ""
        lines.append(
            f"| {r.api} | {_label(r)} | {r.concurrency} | {r.output_tokens_per_s:.1f} | "
            f"{r.ttft_p50_ms:.1f} / {r.ttft_p99_ms:.1f} | {'–' if one_token else f'{r.itl_p50_ms:.1f} / {r.itl_p99_ms:.1f}'} | "
            f"{r.errors} | {ratio} | {delta} |"
        )
    if overhead:
        lines += [
            "",
            "Ingress overhead alone (our stack over a zero-cost test engine streaming "
            f"{meta['overhead_tokens']} tokens per request, every core open to it):",
            "",
            "| layout | route | conc. | requests/s | time to first chunk p50 / p99 ms | per chunk p50 / p99 ms | errors |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in overhead:
            lines.append(
                f"| {r.system} | {r.api} | {r.concurrency} | {r.requests_per_s:.1f} | {r.ttft_p50_ms:.2f} / {r.ttft_p99_ms:.2f} | "
                f"{r.itl_p50_ms:.3f} / {r.itl_p99_ms:.3f} | {r.errors} |"
            )
    return "\n".join(lines) + "\n"


def _label(r: LoadResult) -> str:
    return f"{r.system} (in turns with {r.compared_with})" if r.compared_with else r.system


def _baseline(results: list[LoadResult], r: LoadResult) -> LoadResult | None:
    """Bare vLLM in the turns of the same run, under the same load generator: `/llm` is compared
    with bare `/v1` driven by the same SSE client and the same greedy prompt."""
    if r.system == BASELINE:
        return None
    api = r.api.replace("/llm", "/v1/chat/completions")
    return next(
        (
            b
            for b in results
            if b.system == BASELINE and b.compared_with == r.system and b.api == api and b.concurrency == r.concurrency
        ),
        None,
    )


def plot(results: list[LoadResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ttft, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = sorted({(_label(r), r.api) for r in results if FIRST_TOKEN not in r.api})
    for name, api in series:
        points = sorted((r for r in results if (_label(r), r.api) == (name, api)), key=lambda r: r.concurrency)
        label = f"{name} {api}"
        xs = [r.concurrency for r in points]
        ttft.plot(xs, [r.ttft_p50_ms for r in points], marker="o", label=label)
        throughput.plot(xs, [r.output_tokens_per_s for r in points], marker="o", label=label)
    for axis, title in ((ttft, "median time to first token (ms)"), (throughput, "output tokens/s")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streams")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    throughput.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def marked_section(page: str, section: str, begin: str, end: str) -> str:
    """`page` with everything from `begin` to `end` replaced by `section`, for the focused
    benchmarks that keep a section of their own (bench/routing.py); refused unless the page holds
    each marker once, in that order, so that a run never writes over the wrong part of it."""
    first, last = page.find(begin), page.find(end)
    if first < 0 or last < first or page.count(begin) != 1 or page.count(end) != 1:
        raise ValueError(f"the page needs one {begin} and, after it, one {end}")
    return page[:first] + section + page[last + len(end) :]
