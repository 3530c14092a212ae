"""`make bench` rewrites the marked section of docs/benchmarks.md with the run's table and a link
to its plot, and nothing else of the page."""

from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parent.parent
PAGE = f"""# Benchmarks

How to read the tables.

{report.BEGIN}
an old table
{report.END}

What the figures say.
"""


def test_a_run_replaces_the_section_and_keeps_the_rest_of_the_page(tmp_path):
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text(PAGE)
    report.update_docs(docs, "| a | table |\n", tmp_path / "bench" / "results" / "latest.png")
    page = docs.read_text()
    assert "an old table" not in page
    before, section = page.split(report.BEGIN)
    section, after = section.split(report.END)
    assert before == "# Benchmarks\n\nHow to read the tables.\n\n"
    assert after == "\n\nWhat the figures say.\n"
    assert "| a | table |\n" in section
    assert "](../bench/results/latest.png)" in section  # relative to the page


def test_a_second_run_rewrites_the_same_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(PAGE)
    report.update_docs(docs, "| first |\n", tmp_path / "latest.png")
    report.update_docs(docs, "| second |\n", tmp_path / "latest.png")
    page = docs.read_text()
    assert "| second |" in page and "| first |" not in page
    assert (page.count(report.BEGIN), page.count(report.END)) == (1, 1)


@pytest.mark.parametrize(
    "page", ["no markers", f"{report.END}\n{report.BEGIN}", f"{report.BEGIN}\n{report.BEGIN}\n{report.END}"]
)
def test_a_page_without_one_well_placed_section_is_refused_before_the_run(tmp_path, page):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(page)
    with pytest.raises(ValueError, match="bench:begin"):
        report.check_docs(docs)


def test_the_shipped_page_has_its_section_and_the_latest_table():
    docs = ROOT / report.DOCS
    report.check_docs(docs)
    latest = (ROOT / "bench" / "results" / "latest.md").read_text()
    assert report.docs_section(latest, ROOT / "bench" / "results" / "latest.png", docs) in docs.read_text()
