"""`python -m cluster keys|tenants …` turn their options into one admin API request each."""

import pytest

from cluster.__main__ import _parser
from cluster.admin_client import request_of

URL = ["--url", "http://head:8000"]


def _request(*argv: str):
    return request_of(_parser().parse_args([*argv, *URL]))


def test_a_tenant_is_made_with_its_shared_limits_and_budgets():
    assert _request(
        "tenants", "create", "acme", "--rpm", "60", "--tokens-per-day", "1000", "--spend-per-month", "5"
    ) == (
        "POST",
        "/admin/tenants",
        {"name": "acme", "limits": {"requests_per_minute": 60, "tokens_per_day": 1000, "spend_per_month": 5.0}},
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("tenants", "list"), ("GET", "/admin/tenants", None)),
        (("tenants", "show", "acme"), ("GET", "/admin/tenants/acme", None)),
        (("tenants", "update", "acme", "--disable"), ("PATCH", "/admin/tenants/acme", {"disabled": True})),
        (("tenants", "delete", "acme"), ("DELETE", "/admin/tenants/acme", None)),
        (("keys", "revoke", "alice"), ("DELETE", "/admin/keys/alice", None)),
        (("keys", "rotate", "alice", "--grace-s", "60"), ("POST", "/admin/keys/alice/rotate", {"grace_s": 60.0})),
        (
            ("keys", "create", "alice", "--tenant", "acme", "--tokens-per-month", "9"),
            ("POST", "/admin/keys", {"tenant": "acme", "limits": {"tokens_per_month": 9}, "name": "alice"}),
        ),
        (("keys", "update", "alice", "--tenant", "beta"), ("PATCH", "/admin/keys/alice", {"tenant": "beta"})),
    ],
)
def test_each_verb_is_its_request(argv, expected):
    assert _request(*argv) == expected


def test_a_tenant_has_no_key_only_options():
    with pytest.raises(SystemExit):
        _parser().parse_args(["tenants", "create", "acme", "--models", "m", *URL])
