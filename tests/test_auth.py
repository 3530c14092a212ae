import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from cluster.schema import AuthConfig
from serve_app.errors import Forbidden, Unauthorized
from serve_app.tenancy.keys import KeyRing


def _ring(monkeypatch) -> KeyRing:
    monkeypatch.setenv("TEST_TOKEN", "from-env")
    return KeyRing(
        AuthConfig.model_validate(
            {
                "keys": [
                    {"name": "hashed", "sha256": hashlib.sha256(b"from-hash").hexdigest()},
                    {"name": "env", "env": "TEST_TOKEN"},
                ]
            }
        )
    )


def test_tokens_by_hash_or_environment(monkeypatch):
    ring = _ring(monkeypatch)
    assert ring.authenticate("Bearer from-hash").key_name == "hashed"
    assert ring.authenticate("bearer from-env").key_name == "env"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic from-env", "Bearer from-hashX", "from-env"])
def test_bad_headers_are_refused(monkeypatch, header):
    with pytest.raises(Unauthorized) as raised:
        _ring(monkeypatch).authenticate(header)
    assert raised.value.headers == {"WWW-Authenticate": "Bearer"}


def test_no_keys_means_open():
    assert KeyRing(AuthConfig()).authenticate(None).key_name is None


def test_unset_environment_variable_stops_start_up(monkeypatch):
    monkeypatch.delenv("MISSING_TOKEN", raising=False)
    with pytest.raises(RuntimeError, match="MISSING_TOKEN"):
        KeyRing(AuthConfig.model_validate({"keys": [{"name": "k", "env": "MISSING_TOKEN"}]}))


def test_expired_key_is_refused_and_scopes_are_checked():
    ring = KeyRing(
        AuthConfig.model_validate(
            {
                "keys": [
                    {"name": "old", "sha256": hashlib.sha256(b"old").hexdigest(), "expires_at": "2020-01-01T00:00:00Z"},
                    {"name": "ops", "sha256": hashlib.sha256(b"ops").hexdigest(), "scopes": ["admin"]},
                ]
            }
        )
    )
    with pytest.raises(Unauthorized, match="'old' expired at 2020-01-01T00:00:00"):
        ring.authenticate("Bearer old")
    ops = ring.authenticate("Bearer ops")
    ops.require("admin")
    with pytest.raises(Forbidden, match="lacks the 'chat' scope"):
        ops.require("chat")


def _key_expiring(at: datetime) -> KeyRing:
    return KeyRing(
        AuthConfig.model_validate(
            {
                "keys": [
                    {"name": "dated", "sha256": hashlib.sha256(b"dated").hexdigest(), "expires_at": at.isoformat()},
                ]
            }
        )
    )


def test_a_key_that_expired_yesterday_is_refused_naming_its_expiry():
    yesterday = datetime.now(UTC) - timedelta(days=1)
    with pytest.raises(Unauthorized) as raised:
        _key_expiring(yesterday).authenticate("Bearer dated")
    assert raised.value.message == f"API key 'dated' expired at {yesterday.isoformat()}"
    assert raised.value.headers == {"WWW-Authenticate": "Bearer"}


def test_a_key_that_expires_tomorrow_is_accepted():
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    assert _key_expiring(tomorrow).authenticate("Bearer dated").key_name == "dated"


def test_an_expiry_without_a_zone_is_utc():
    """Yesterday's UTC wall-clock time, written without a zone, has passed wherever the server is."""
    yesterday = (datetime.now(UTC) - timedelta(days=1)).replace(tzinfo=None)
    with pytest.raises(Unauthorized, match="expired at"):
        _key_expiring(yesterday).authenticate("Bearer dated")
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(tzinfo=None)
    assert _key_expiring(tomorrow).authenticate("Bearer dated").key_name == "dated"
