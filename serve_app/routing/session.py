"""Session affinity: the requests of one session go to one replica of the model while it lives,
so that a conversation's turns find their history in that engine's prefix cache.

The session is read in the ingress (`session_of`) and travels in the model call's handle options
(`session_id`, Serve's own field for it), where `SessionAffinityRouter`, the model's request
router, running in the ingress's process, reads it. Replicas are found by consistent hashing
(`HashRing`): every ingress replica builds the same ring from the same replica ids and so sends a
session to the same replica with nothing shared between them, and a replica added or gone moves
only the sessions of its share of the ring."""

import bisect
import hashlib
import random
from collections.abc import Iterable, Mapping

from ray.serve.context import _get_serve_request_context
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


def session_of(request: object) -> str:
    """The `x-session-id` header, as Serve's proxy read it into the request's context (under the
    name `RAY_SERVE_SESSION_ID_HEADER_KEY` gives, `-` and `_` alike), else the OpenAI `user`
    field of the requests that have one; "" for none. Serve has no public reader of that
    context's session; the end-to-end test of sessions fails if this one goes."""
    return _get_serve_request_context().session_id or getattr(request, "user", None) or ""


class HashRing:
    """Replicas at `points` places each on a ring of 64-bit hashes; a key belongs to the first
    place at or after its own hash. blake2b, not `hash()`, whose strings hash differently in every
    process."""

    def __init__(self, nodes: Iterable[str], points: int) -> None:
        places = sorted((_hash(f"{node}:{point}"), node) for node in nodes for point in range(points))
        self._hashes = [place for place, _ in places]
        self._nodes = [node for _, node in places]

    def node(self, key: str) -> str | None:
        if not self._nodes:
            return None
        return self._nodes[bisect.bisect_left(self._hashes, _hash(key)) % len(self._nodes)]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def overloaded(home: str, queue_lens: Mapping[str, int | None], imbalanced_threshold: int) -> bool:
    """Whether the session's replica holds more than `imbalanced_threshold` requests beyond the
    least loaded one, by the router's cache of their queue lengths (a replica not in it is not
    counted, and a home not in it is not overloaded: the router asks it before sending)."""
    home_len = queue_lens.get(home)
    known = [length for length in queue_lens.values() if length is not None]
    return home_len is not None and home_len - min(known) > imbalanced_threshold


class SessionAffinityRouter(RequestRouter):
    """A session's request goes to its replica on the ring; a request without a session, or whose
    replica holds `imbalanced_threshold` requests beyond the least loaded, goes to the less loaded
    of two replicas picked at random, as with Serve's default; a full replica (at its
    `max_ongoing_requests`) refuses and the request goes by load too.

    Ours rather than Ray's experimental `ConsistentHashRouter`
    (`ray.serve.experimental.consistent_hash_router`), which hashes a request without a session
    on its request id (at random, blind to load), falls back only when the session's replica
    refuses, and then to its neighbours on the ring rather than by load, and replaces the base
    router's private routing loop."""

    def initialize_state(self, imbalanced_threshold: int = 16, virtual_nodes: int = 100) -> None:
        self._imbalanced_threshold = imbalanced_threshold
        self._virtual_nodes = virtual_nodes
        self._ring = HashRing((), virtual_nodes)
        self._by_unique_id: dict[str, ReplicaID] = {}

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        by_unique_id = {replica_id.unique_id: replica_id for replica_id in self.curr_replicas}
        if by_unique_id.keys() != self._by_unique_id.keys():
            self._ring = HashRing(by_unique_id, self._virtual_nodes)
        self._by_unique_id = by_unique_id

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_load = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        if pending_request is None:
            return [by_load]
        # Past every rank, wait before choosing again (as Serve's default does once it has
        # tried every replica) rather than ask the same full replicas at once.
        pending_request.routing_context.should_backoff = True
        session = pending_request.metadata.session_id
        home_id = self._ring.node(session) if session else None
        if home_id is None:
            return [by_load]
        cache = self.replica_queue_len_cache
        queue_lens = {replica.replica_id.unique_id: cache.get(replica.replica_id) for replica in candidate_replicas}
        home = self.curr_replicas.get(self._by_unique_id[home_id])
        if home is None or overloaded(home_id, queue_lens, self._imbalanced_threshold):
            return [by_load]
        return [[home], by_load]
