"""`python -m cluster validate FILE` checks a config; `python -m cluster render FILE` prints the
normalized Serve config it deploys; `python -m cluster render kuberay FILE` prints a KubeRay
RayService manifest embedding it."""

import argparse
import sys

from cluster import render
from cluster.load import ConfigError, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("validate", help="check a config file").add_argument("file")
    rendering = sub.add_parser("render", help="print the Serve config, or a KubeRay RayService, of a config file")
    rendering.add_argument("target", nargs="?", choices=["serve", "kuberay"], default="serve")
    rendering.add_argument("file")
    rendering.add_argument("--name", default="llm", help="RayService name (kuberay)")
    rendering.add_argument("--image", default="livepeer-llm-serve:0.1.0-gpu",
                           help="an image with this project and vLLM installed (kuberay)")
    rendering.add_argument("--gpus-per-node", type=int, help="GPUs per worker pod (kuberay; default: largest tensor-parallel size)")
    args = parser.parse_args(argv)
    try:
        loaded = load(args.file)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    if args.command == "validate":
        for name, config in loaded.apps.items():
            models = ", ".join(model.id for model in config.models)
            print(f"{args.file}: application {name!r} is valid (models: {models})")
        return 0
    if args.target == "kuberay":
        document = render.kuberay(loaded, name=args.name, image=args.image, gpus_per_node=args.gpus_per_node)
    else:
        document = render.normalized(loaded)
    print(render.to_yaml(document), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
