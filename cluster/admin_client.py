"""`python -m cluster keys create|list|show|update|rotate|revoke … --url URL` and `python -m cluster
tenants create|list|show|update|delete … --url URL`: the admin API of a running cluster, from a
shell. The admin key is read from the environment (`LLM_ADMIN_KEY`), so that it stays out of the
shell's history and the process list."""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

TOKEN_ENV = "LLM_ADMIN_KEY"
LIMITS = (
    ("--rpm", int, "requests_per_minute", "requests per minute"),
    ("--tpm", int, "tokens_per_minute", "tokens per minute"),
    ("--concurrency", int, "concurrent_requests", "requests in flight"),
    ("--tokens-per-day", int, "tokens_per_day", "a budget of tokens per UTC day"),
    ("--tokens-per-month", int, "tokens_per_month", "a budget of tokens per UTC month"),
    ("--spend-per-day", float, "spend_per_day", "a budget of spend per UTC day, in the models' price currency"),
    ("--spend-per-month", float, "spend_per_month", "a budget of spend per UTC month"),
)
FIELDS = ("models", "scopes", "expires_at", "disabled", "tenant")
PATHS = {"keys": "/admin/keys", "tenants": "/admin/tenants"}


def add_verbs(verbs: argparse._SubParsersAction, resource: str = "keys") -> None:
    """The verbs of `keys` or of `tenants`, each one request to the admin API."""
    noun = resource.rstrip("s")

    def verb(name: str, help: str, named: bool = True) -> argparse.ArgumentParser:
        parser = verbs.add_parser(name, help=help)
        if named:
            parser.add_argument("name")
        parser.add_argument("--url", required=True, help="the cluster's HTTP address, e.g. http://head:8000")
        parser.set_defaults(func=_run, verb=name, resource=resource)
        return parser

    made = "make a key on a running cluster; prints its secret once" if resource == "keys" else "make a tenant"
    for parser in (verb("create", made), verb("update", f"change a {noun} (only the options given)")):
        for flag, kind, dest, help in LIMITS:
            parser.add_argument(flag, type=kind, dest=dest, help=help)
        if resource == "keys":
            parser.add_argument("--models", nargs="+", metavar="PATTERN", help="model names or glob patterns")
            parser.add_argument("--scopes", nargs="+", choices=["chat", "admin"], help="the routes it may call")
            parser.add_argument("--expires", dest="expires_at", help="ISO 8601 time from which it is refused")
            parser.add_argument("--tenant", help="the tenant whose limits and budgets it shares")
    update = verbs.choices["update"]
    update.add_argument("--disable", dest="disabled", action="store_const", const=True, help="suspend it")
    update.add_argument("--enable", dest="disabled", action="store_const", const=False, help="restore it")
    verb("list", f"list the {resource}" + (" (never their secrets)" if resource == "keys" else ""), named=False)
    verb("show", f"show one {noun}, with what its budgets have used")
    if resource == "keys":
        rotate = verb("rotate", "give a key a new secret; prints it once")
        rotate.add_argument("--grace-s", type=float, default=0, help="seconds the old secret stays valid")
        verb("revoke", "delete a key: refused everywhere within a second")
    else:
        verb("delete", "delete a tenant that no key belongs to")


def request_of(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """The method, path and JSON body of a verb."""
    collection = PATHS[getattr(args, "resource", "keys")]
    if args.verb == "list":
        return "GET", collection, None
    path = f"{collection}/{args.name}"
    if args.verb == "show":
        return "GET", path, None
    if args.verb in ("revoke", "delete"):
        return "DELETE", path, None
    if args.verb == "rotate":
        return "POST", path + "/rotate", {"grace_s": args.grace_s}
    body: dict[str, Any] = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    limits = {dest: getattr(args, dest) for _, _, dest, _ in LIMITS if getattr(args, dest) is not None}
    if limits:
        body["limits"] = limits
    if args.verb == "create":
        return "POST", collection, body | {"name": args.name}
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
