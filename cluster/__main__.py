"""`python -m cluster validate FILE` checks a config; `python -m cluster render FILE` prints the
Serve config it deploys, with every default spelled out where the schema sets one."""

import argparse
import sys

from cluster import render
from cluster.load import ConfigError, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("validate", help="check a config file").add_argument("file")
    sub.add_parser("render", help="print the Serve config of a config file").add_argument("file")
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
    http = loaded.serve_config.get("http_options", {})
    for name, config in loaded.apps.items():
        document = render.serve_config(
            config, app_name=name, host=http.get("host", "0.0.0.0"), port=http.get("port", 8000)
        )
        print(render.to_yaml(document), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
