"""New API keys: a random token for the user, and the config lines that hold only its digest."""

import hashlib
import secrets
from typing import Any

from cluster.schema import ApiKey


def new_token() -> str:
    """A new key's secret, for the config (`keys new`) and the admin API alike."""
    return "sk-" + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """The sha256 hex digest a key is held by."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_key(
    name: str,
    *,
    models: list[str] | None = None,
    admin: bool = False,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    concurrent_requests: int | None = None,
    expires_at: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Returns the token and its `auth.keys` entry, validated as the config will validate it."""
    token = new_token()
    limits = {
        "requests_per_minute": requests_per_minute,
        "tokens_per_minute": tokens_per_minute,
        "concurrent_requests": concurrent_requests,
    }
    entry: dict[str, Any] = {"name": name, "sha256": token_digest(token)}
    if expires_at is not None:
        entry["expires_at"] = expires_at
    if models:
        entry["models"] = models
    if admin:
        entry["scopes"] = ["chat", "admin"]
    if any(value is not None for value in limits.values()):
        entry["limits"] = {field: value for field, value in limits.items() if value is not None}
    ApiKey.model_validate(entry)
    return token, entry
