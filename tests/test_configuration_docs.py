"""docs/configuration.md is generated from the schema's field descriptions: it must be the page the
schema generates now, and no field may leave a hole in it."""

from pathlib import Path

from pydantic import BaseModel, Field

from cluster import reference

ROOT = Path(__file__).resolve().parent.parent


def test_every_field_and_model_of_the_config_is_described():
    assert reference.undescribed() == []


def test_docs_configuration_md_is_what_the_schema_generates():
    page = (ROOT / reference.DEFAULT_PATH).read_text()
    assert page == reference.markdown(), "docs/configuration.md is out of date: run `make docs`"


class _Inner(BaseModel):
    """Described."""

    bare: int = 1


class _Outer(BaseModel):
    described: _Inner = Field(default_factory=_Inner, description="an inner model")
    items: list[_Inner] = Field(default_factory=list, description="more of them")


def test_a_field_without_a_description_is_found_through_lists_and_nesting():
    assert reference.undescribed(_Outer) == ["_Outer", "_Inner.bare"]
    assert [path for _, path in reference.models(_Outer)] == ["", "described"]


def test_a_field_is_listed_with_its_type_constraints_and_default():
    page = reference.markdown()
    assert "| `flush_interval_s` | number > 0, ≤ 60 | `1.0` |" in page
    assert "| `max_model_len` | integer > 0 or null | `null` |" in page
    assert (
        "| `source` | one of [HubSource](#hubsource), [PathSource](#pathsource), [PackageGGUFSource](#packageggufsource), [PackageArchiveSource](#packagearchivesource) | required |"
        in page
    )
    assert "At `auth.keys[].limits`." in page


def test_the_cli_verb_prints_or_writes_the_page(tmp_path, capsys):
    from cluster.__main__ import main

    assert main(["docs"]) == 0
    assert capsys.readouterr().out == reference.markdown()
    assert main(["docs", "--write", str(tmp_path / "configuration.md")]) == 0
    assert (tmp_path / "configuration.md").read_text() == reference.markdown()
