"""`python -m cluster validate FILE` checks a config; `python -m cluster serve FILE` checks it and
runs `serve run FILE` as `make serve` does; `python -m cluster render FILE` prints the normalized
Serve config it deploys; `python -m cluster render kuberay FILE` prints a KubeRay RayService
manifest embedding it; `python -m cluster env` prints the exports a node needs before `ray start`;
`python -m cluster keys new NAME` makes an API key for the config, `python -m cluster keys
create|list|show|update|rotate|revoke … --url URL` manages keys on a running cluster, and
`python -m cluster tenants create|list|show|update|delete … --url URL` its tenants;
`python -m cluster docs` prints the config
reference (docs/configuration.md) from the schema's field descriptions."""

import argparse
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from cluster import admin_client, reference, render, runtime
from cluster.keys import new_key
from cluster.load import ConfigError, LoadedConfig, describe, load


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster")
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a config file")
    validate.add_argument("file")
    validate.set_defaults(func=_validate)

    serve = sub.add_parser("serve", help="check a config file and `serve run` it with this node's settings")
    serve.add_argument("file")
    serve.set_defaults(func=_serve)

    sub.add_parser("env", help="print the environment a Ray node needs, as shell exports").set_defaults(func=_env)

    rendering = sub.add_parser("render", help="print the Serve config, or a KubeRay RayService, of a config file")
    rendering.add_argument("target", nargs="?", choices=["serve", "kuberay"], default="serve")
    rendering.add_argument("file")
    rendering.add_argument("--name", default="llm", help="RayService name (kuberay)")
    rendering.add_argument(
        "--image",
        default=render.IMAGE,
        help="an image with this project and vLLM installed (kuberay; default: %(default)s, built by `make image-gpu`)",
    )
    rendering.add_argument(
        "--gpus-per-node", type=int, help="GPUs per worker pod (kuberay; default: largest tensor-parallel size)"
    )
    rendering.set_defaults(func=_render)

    keys = sub.add_parser("keys", help="make API keys, or manage them on a running cluster").add_subparsers(
        dest="action", required=True
    )
    new = keys.add_parser("new", help="print a new random key and its config lines")
    new.add_argument("name")
    new.add_argument("--models", nargs="+", metavar="PATTERN", help="model names or glob patterns (default: all)")
    new.add_argument("--admin", action="store_true", help="may also call the admin routes")
    new.add_argument("--rpm", type=int, dest="requests_per_minute", help="requests per minute")
    new.add_argument("--tpm", type=int, dest="tokens_per_minute", help="tokens (prompt + completion) per minute")
    new.add_argument("--concurrency", type=int, dest="concurrent_requests", help="requests in flight")
    new.add_argument("--expires", dest="expires_at", help="ISO 8601 time from which the key is refused")
    new.set_defaults(func=_new_key)
    admin_client.add_verbs(keys)
    tenants = sub.add_parser("tenants", help="manage tenants on a running cluster").add_subparsers(
        dest="action", required=True
    )
    admin_client.add_verbs(tenants, "tenants")

    docs = sub.add_parser("docs", help="print the config reference, generated from the schema")
    docs.add_argument(
        "--write",
        nargs="?",
        const=reference.DEFAULT_PATH,
        type=Path,
        metavar="PATH",
        help=f"write it to PATH instead (default: {reference.DEFAULT_PATH})",
    )
    docs.set_defaults(func=_docs)
    return parser


def _env(args: argparse.Namespace) -> int:
    print("".join(f"export {name}={value}\n" for name, value in runtime.NODE_ENV.items()), end="")
    return 0


def _new_key(args: argparse.Namespace) -> int:
    options = {name: value for name, value in vars(args).items() if name not in ("command", "action", "func")}
    try:
        token, entry = new_key(**options)
    except ValidationError as error:
        print(f"invalid key:\n{describe(error)}", file=sys.stderr)
        return 1
    print(f"# API key for {args.name!r}: give it to its user; it is shown only this once.\n# {token}")
    print("# Add under `auth: keys:` in the config:")
    print(render.to_yaml([entry]), end="")
    return 0


def _docs(args: argparse.Namespace) -> int:
    text = reference.markdown()
    if args.write is None:
        print(text, end="")
    else:
        args.write.write_text(text)
        print(f"wrote {args.write}")
    return 0


def _loaded(file: str) -> LoadedConfig | None:
    try:
        return load(file)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    loaded = _loaded(args.file)
    if loaded is None:
        return 1
    for name, config in loaded.apps.items():
        models = ", ".join(model.id for model in config.models)
        print(f"{args.file}: application {name!r} is valid (models: {models})")
    return 0


def _render(args: argparse.Namespace) -> int:
    loaded = _loaded(args.file)
    if loaded is None:
        return 1
    if args.target == "kuberay":
        document = render.kuberay(loaded, name=args.name, image=args.image, gpus_per_node=args.gpus_per_node)
    else:
        document = render.normalized(loaded)
    print(render.to_yaml(document), end="")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Replaces this process with `serve run`, once the file is valid."""
    if _loaded(args.file) is None:
        return 1
    os.environ.update(runtime.NODE_ENV)
    split = runtime.core_split()
    if split is not None:
        runtime.pin(split)
        print(f"engine on cores {','.join(map(str, split.engine))}, Ray's processes on core {split.ray}", flush=True)
    runtime.take_stop_signals()
    serve = str(Path(sys.executable).parent / "serve")
    os.execv(serve, [serve, "run", args.file])


if __name__ == "__main__":
    sys.exit(main())
