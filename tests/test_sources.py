"""Model sources made loadable from disk without Ray: a zipped checkpoint in a package unpacked
once, whole or not at all; a package or file that is missing named."""

import sys
import zipfile
from pathlib import Path

import pytest

from cluster.schema import PackageArchiveSource
from serve_app.models import sources


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """An installed package (on sys.path) carrying a zipped checkpoint."""
    folder = tmp_path / "site" / "zipped_model"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('never imported')\n")
    with zipfile.ZipFile(folder / "model.zip", "w") as archive:
        archive.writestr("config.json", '{"model_type": "bert"}')
        archive.writestr("1_Pooling/config.json", "{}")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site"), *sys.path])
    return folder


def test_a_zipped_checkpoint_is_unpacked_once_into_the_cache(package, tmp_path):
    source = PackageArchiveSource(package="zipped_model", archive="model.zip")
    path = Path(sources.resolve(source, tmp_path / "cache"))
    assert path == tmp_path / "cache" / "zipped_model--model"
    assert (path / "config.json").read_text() == '{"model_type": "bert"}' and (path / "1_Pooling").is_dir()
    (path / "marker").write_text("kept")  # a second start finds it made and leaves it
    assert Path(sources.resolve(source, tmp_path / "cache")) == path and (path / "marker").exists()
    assert not (tmp_path / "cache" / "zipped_model--model.partial").exists()


def test_a_missing_package_or_archive_is_named(package, tmp_path):
    with pytest.raises(FileNotFoundError, match="'no_such_package' is not installed"):
        sources.resolve(PackageArchiveSource(package="no_such_package", archive="model.zip"), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"package 'zipped_model' has no file 'other\.zip'"):
        sources.resolve(PackageArchiveSource(package="zipped_model", archive="other.zip"), tmp_path)
