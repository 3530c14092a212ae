"""The ledger's and the rate limiter's replicas import only their own modules. Loading vLLM there
took each of them 10 s or more to start, and a redeploy replaces the ledger with the ingress: the
old ingress, storing its held rows, waited that long for the new ledger."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module", ["serve_app.tenancy.ledger", "serve_app.tenancy.ledger_client", "serve_app.tenancy.limiter"]
)
def test_a_support_replica_does_not_load_the_engine(module):
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(sorted({{'vllm', 'torch'}} & set(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert loaded == "[]"
