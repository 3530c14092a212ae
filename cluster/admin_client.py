"""`python -m cluster keys create|list|show|update|rotate|revoke … --url URL`: the admin key API of
a running cluster, from a shell. The admin key is read from the environment (`LLM_ADMIN_KEY`), so
that it stays out of the shell's history and the process list."""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

TOKEN_ENV = "LLM_ADMIN_KEY"


def add_verbs(keys: argparse._SubParsersAction) -> None:
    def verb(name: str, help: str, named: bool = True) -> argparse.ArgumentParser:
        parser = keys.add_parser(name, help=help)
        if named:
            parser.add_argument("name")
        parser.add_argument("--url", required=True, help="the cluster's HTTP address, e.g. http://head:8000")
        parser.set_defaults(func=_run, verb=name)
        return parser

    for parser in (
        verb("create", "make a key on a running cluster; prints its secret once"),
        verb("update", "change a key (only the options given)"),
    ):
        parser.add_argument("--models", nargs="+", metavar="PATTERN", help="model names or glob patterns")
        parser.add_argument("--scopes", nargs="+", choices=["chat", "admin"], help="the routes it may call")
        parser.add_argument("--rpm", type=int, dest="requests_per_minute", help="requests per minute")
        parser.add_argument("--tpm", type=int, dest="tokens_per_minute", help="tokens per minute")
        parser.add_argument("--concurrency", type=int, dest="concurrent_requests", help="requests in flight")
        parser.add_argument("--expires", dest="expires_at", help="ISO 8601 time from which it is refused")
    update = keys.choices["update"]
    update.add_argument("--disable", dest="disabled", action="store_const", const=True, help="suspend it")
    update.add_argument("--enable", dest="disabled", action="store_const", const=False, help="restore it")
    verb("list", "list the keys (never their secrets)", named=False)
    verb("show", "show one key")
    rotate = verb("rotate", "give a key a new secret; prints it once")
    rotate.add_argument("--grace-s", type=float, default=0, help="seconds the old secret stays valid")
    verb("revoke", "delete a key: refused everywhere within a second")


def request_of(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """The method, path and JSON body of a verb."""
    if args.verb == "list":
        return "GET", "/admin/keys", None
    path = f"/admin/keys/{args.name}"
    if args.verb == "show":
        return "GET", path, None
    if args.verb == "revoke":
        return "DELETE", path, None
    if args.verb == "rotate":
        return "POST", path + "/rotate", {"grace_s": args.grace_s}
    body: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("models", "scopes", "expires_at", "disabled")
        if getattr(args, name, None) is not None
    }
    limits = {
        name: getattr(args, name)
        for name in ("requests_per_minute", "tokens_per_minute", "concurrent_requests")
        if getattr(args, name) is not None
    }
    if limits:
        body["limits"] = limits
    if args.verb == "create":
        return "POST", "/admin/keys", body | {"name": args.name}
    return "PATCH", path, body


def _run(args: argparse.Namespace) -> int:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        print(f"set {TOKEN_ENV} to an admin key's secret", file=sys.stderr)
        return 2
    method, path, body = request_of(args)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        print(f"{error.code}: {json.loads(error.read()).get('error', {}).get('message')}", file=sys.stderr)
        return 1
    except urllib.error.URLError as error:
        print(f"cannot reach {args.url}: {error.reason}", file=sys.stderr)
        return 1
    if "key" in answer:
        print(f"# the secret of {answer['name']!r}, shown only this once:\n{answer['key']}", file=sys.stderr)
        answer = {name: value for name, value in answer.items() if name != "key"}
    print(json.dumps(answer, indent=2))
    return 0
