"""The key registry: the one Serve replica that writes runtime keys and tenants, and the ingress's
side of it.

Every ingress replica holds the whole set of runtime keys and tenants in memory, so a request's key lookup
never leaves its replica. It learns of changes by long polling: its call to `changes` is answered
as soon as any change is committed (or empty after a timeout), so a created, changed, rotated or
revoked key reaches every replica within one call's round trip, with no redeploy and no replica
replaced. A replica that starts loads the keys before it serves; a registry that restarts reads
its revision back from the database.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from serve_app.tenancy.key_store import KeyExists, KeySnapshot, KeyStore, NoSuchKey, Stored, StoredKey, TenantInUse
from serve_app.tenancy.keys import KeyRing

logger = logging.getLogger("ray.serve")

_NOUNS = {"key": "API key", "tenant": "tenant"}
CHANGES_TIMEOUT_S = 5.0
"""How long a replica's poll waits for a change before it is answered empty and asked again:
short enough that a stopping registry sees its polls end by themselves (STOP_S)."""
RETRY_S = 0.5
FIRST_LOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Refusal:
    """A change the registry refused, with the status the admin route answers."""

    status: int
    message: str


class KeyRegistry:
    """Its methods never await between reading and writing the store, so changes from many
    ingress replicas are applied one at a time."""

    def __init__(self, database: str, config_key_names: list[str], config_tenant_names: list[str] = ()) -> None:
        self._store = KeyStore(database)
        self._config = {"key": set(config_key_names), "tenant": set(config_tenant_names)}
        self._snapshot = self._store.snapshot()
        self._changed = asyncio.Event()

    async def changes(self, revision: int, timeout_s: float = CHANGES_TIMEOUT_S) -> KeySnapshot | None:
        """The keys once the revision is past `revision`; None if nothing changed within the timeout."""
        while self._snapshot.revision <= revision:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout_s)
            except TimeoutError:
                return None
        return self._snapshot

    async def create(self, record: Stored, actor: str | None) -> KeySnapshot | Refusal:
        kind = "key" if isinstance(record, StoredKey) else "tenant"
        if record.name in self._config[kind]:
            return Refusal(409, f"{_NOUNS[kind]} {record.name!r} is defined in the config; choose another name")
        if isinstance(record, StoredKey) and (refusal := self._unknown_tenant(record.tenant)):
            return refusal
        try:
            self._store.create(record, actor)
        except KeyExists:
            return Refusal(409, f"{_NOUNS[kind]} {record.name!r} exists already")
        return self._published()

    async def update(
        self, kind: str, name: str, changes: dict[str, Any], actor: str | None, action: str = "update"
    ) -> KeySnapshot | Refusal:
        if name in self._config[kind]:
            return Refusal(409, f"{_NOUNS[kind]} {name!r} is defined in the config: change it there")
        if kind == "key" and (refusal := self._unknown_tenant(changes.get("tenant"))):
            return refusal
        try:
            self._store.update(kind, name, changes, actor, action)
        except NoSuchKey:
            return Refusal(404, f"no {_NOUNS[kind]} named {name!r} was made through this API")
        return self._published()

    async def rotate(self, name: str, digest: str, grace_s: float, actor: str | None) -> KeySnapshot | Refusal:
        """A new secret; the current one stays valid for `grace_s`. Read and written in one step
        here, so that two rotations at once cannot both keep the same old secret."""
        current = next((key for key in self._snapshot.keys if key.name == name), None)
        if current is None and name not in self._config["key"]:
            return Refusal(404, f"no API key named {name!r} was made through this API")
        changes = {
            "digest": digest,
            "previous_digest": current.digest if current is not None and grace_s > 0 else None,
            "previous_valid_until": time.time() + grace_s if grace_s > 0 else None,
        }
        return await self.update("key", name, changes, actor, "rotate")

    async def delete(self, kind: str, name: str, actor: str | None) -> KeySnapshot | Refusal:
        if name in self._config[kind]:
            return Refusal(409, f"{_NOUNS[kind]} {name!r} is defined in the config: remove it there")
        try:
            self._store.delete(kind, name, actor)
        except NoSuchKey:
            return Refusal(404, f"no {_NOUNS[kind]} named {name!r} was made through this API")
        except TenantInUse as error:
            return Refusal(
                409, f"tenant {name!r} still has API keys ({', '.join(error.keys)}): delete or move them first"
            )
        return self._published()

    def _unknown_tenant(self, tenant: str | None) -> Refusal | None:
        if tenant is None or tenant in self._config["tenant"]:
            return None
        if any(stored.name == tenant for stored in self._snapshot.tenants):
            return None
        return Refusal(400, f"tenant: no tenant named {tenant!r}; make it first (POST /admin/tenants)")

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        return self._store.audit(limit)

    def _published(self) -> KeySnapshot:
        """Wakes every waiting poll; later polls wait on a new event."""
        self._snapshot = self._store.snapshot()
        self._changed.set()
        self._changed = asyncio.Event()
        return self._snapshot


STOP_S = 6.0
"""How long a stopping registry waits for its requests (Serve's default is 20 s): the ingress
replicas' polls, each answered within CHANGES_TIMEOUT_S, and writes, each done or refused within
the store's lock timeout on SQLite (5 s, serve_app/tenancy/database.py), so that a stop cuts
neither. A poll cut all the same (the registry's replica died) is asked again of the one that
follows."""


def registry_options(actor_options: dict[str, Any]) -> dict[str, Any]:
    """One replica; every ingress replica keeps one poll open on it at all times."""
    return {
        "name": "key-registry",
        "num_replicas": 1,
        "max_ongoing_requests": 4096,
        "graceful_shutdown_timeout_s": STOP_S,
        "ray_actor_options": actor_options,
    }


class KeyWatch:
    """The ingress's side: keeps its `KeyRing`'s runtime keys current."""

    def __init__(self, registry: DeploymentHandle, keys: KeyRing) -> None:
        self._registry = registry
        self._keys = keys
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Loads the keys before the replica serves (bounded: a registry still starting does not
        hold the ingress back for long; its keys then arrive with the first poll answered)."""
        try:
            snapshot = await asyncio.wait_for(self._registry.changes.remote(-1, 0), FIRST_LOAD_TIMEOUT_S)
        except Exception:
            logger.exception("the key registry did not answer; serving the config's keys until it does")
        else:
            if snapshot is not None:
                self._keys.replace_runtime(snapshot)
        self._task = asyncio.get_running_loop().create_task(self._follow())

    def apply(self, snapshot: KeySnapshot) -> None:
        """A change this replica made itself takes effect here at once."""
        if snapshot.revision > self._keys.revision:
            self._keys.replace_runtime(snapshot)
            # The unix time, for `python -m bench.key_propagation` to set against the change's.
            logger.info(
                "runtime keys at revision %d (%d keys) t=%.6f", snapshot.revision, len(snapshot.keys), time.time()
            )

    async def call(self, method: str, *args: Any) -> KeySnapshot | Refusal | Any:
        result = await getattr(self._registry, method).remote(*args)
        if isinstance(result, KeySnapshot):
            self.apply(result)
        return result

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _follow(self) -> None:
        while True:
            try:
                snapshot = await self._registry.changes.remote(self._keys.revision)
                if snapshot is not None:
                    self.apply(snapshot)
            except asyncio.CancelledError:
                raise
            except RayActorError:
                logger.warning("the key registry's replica is gone; asking its successor in %.1f s", RETRY_S)
                await asyncio.sleep(RETRY_S)
            except Exception:
                logger.exception("following the key registry failed; asking again in %.1f s", RETRY_S)
                await asyncio.sleep(RETRY_S)
