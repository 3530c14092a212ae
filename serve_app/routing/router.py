"""Model name (id or alias, or empty for the default) to the call that streams the model's
outputs for a request of any API, within the models the caller's key may use."""

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from ray.serve.handle import DeploymentHandle

from cluster.schema import ClusterConfig, ModelConfig, Price
from serve_app.errors import NotFound
from serve_app.models.adapters import Adapters
from serve_app.models.outputs import ModelOutput
from serve_app.models.requests import EngineRequest
from serve_app.models.runner import InProcessStream, ModelRunner
from serve_app.routing.session import session_of
from serve_app.tenancy.keys import Caller


class ModelStream(Protocol):
    """A model's outputs for one request: a Serve handle's response generator, or an
    `InProcessStream` from a model in the ingress's own replica."""

    def __aiter__(self) -> AsyncIterator[ModelOutput]: ...

    def __anext__(self): ...

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class Route:
    model_id: str
    call: Callable[[EngineRequest], ModelStream]
    first_output_timeout_s: float
    price: Price | None = None
    max_model_len: int | None = None
    """The model's context length, where the config sets it: the most a request can use."""
    parent: str | None = None
    """For a LoRA adapter, its base model's id."""


def _call(
    model: DeploymentHandle | ModelRunner, by_session: bool, adapter_id: str | None = None
) -> Callable[[EngineRequest], ModelStream]:
    if isinstance(model, ModelRunner):
        return lambda request: InProcessStream(model.answer(request))
    # One streaming handle per model (and adapter), made once: `.options()` per request is costly.
    # Calls go over Serve's gRPC transport rather than Ray actor calls, which cost more per request
    # and per token through the ingress (docs/benchmarks.md, "Ingress overhead alone"). An adapter
    # rides as Serve's multiplexed model id, which its model's replicas load it by and Serve's
    # router prefers the replicas that hold it by.
    options = {"stream": True, "_by_reference": False} | ({"multiplexed_model_id": adapter_id} if adapter_id else {})
    answer = model.options(**options).answer
    if not by_session:
        return answer.remote

    # A session rides in the call's options, where the model's request router reads it: one
    # more `.options()` for the requests that carry one, and only for models routed by session.
    def call(request: EngineRequest) -> ModelStream:
        session = session_of(request)
        return (answer.options(session_id=session) if session else answer).remote(request)

    return call


def _by_session(model: ModelConfig) -> bool:
    return model.routing is not None and model.routing.policy == "session"


class Router:
    def __init__(self, config: ClusterConfig, models: dict[str, DeploymentHandle | ModelRunner]) -> None:
        self._models = models
        self._configs = {m.id: m for m in config.models}
        self._routes = {m.id: self._route(m) for m in config.models}
        self._ids = {name: m.id for m in config.models for name in (m.id, *m.aliases)}
        self._default = config.default_model_id
        self.model_ids = [m.id for m in config.models]
        self.names = {m.id: (m.id, *m.aliases) for m in config.models}
        self._adapters = {m.id: Adapters(m.lora) for m in config.models if m.lora is not None}
        self._adapter_routes: dict[tuple[str, str], Route] = {}

    def _route(self, model: ModelConfig, adapter_id: str | None = None) -> Route:
        return Route(
            adapter_id or model.id,
            _call(self._models[model.id], _by_session(model), adapter_id),
            model.deployment.first_output_timeout_s,
            model.price,
            model.engine.max_model_len,
            model.id if adapter_id else None,
        )

    def resolve(self, name: str | None, caller: Caller) -> Route:
        """A model the key may not use is answered as one that does not exist, with the list of
        those the key may use and no others, so that keys cannot discover hidden models
        (docs/livepeer-contract.md). An adapter is named by its id or as `<base id>:<id>`, and
        the key's allow-list sees both names."""
        model_id = self._ids.get(name) if name else self._default
        if model_id is not None and caller.may_use(self.names[model_id]):
            return self._routes[model_id]
        found = self._adapter(name) if name and model_id is None else None
        if found is not None and caller.may_use(_adapter_names(*found)):
            return self._adapter_route(*found)
        usable = [n for usable_id in self.models_for(caller) for n in self.names[usable_id]]
        usable += [adapter_id for adapter_id, _ in self.adapters_for(caller)]
        listed = ", ".join(usable) or "none"
        if not name:
            raise NotFound(f"name a model: the default model is not one this key may use; available models: {listed}")
        raise NotFound(f"model {name!r} does not exist or you do not have access to it; available models: {listed}")

    def _adapter(self, name: str) -> tuple[str, str] | None:
        """(adapter id, base model id), for an adapter of a model, on disk now."""
        base, _, adapter_id = name.rpartition(":")
        if base:
            base_id = self._ids.get(base)
            adapters = self._adapters.get(base_id) if base_id else None
            return (adapter_id, base_id) if adapters and adapters.path(adapter_id) else None
        return next(((name, base_id) for base_id, a in self._adapters.items() if a.path(name)), None)

    def _adapter_route(self, adapter_id: str, base_id: str) -> Route:
        route = self._adapter_routes.get((base_id, adapter_id))
        if route is None:
            route = self._adapter_routes[base_id, adapter_id] = self._route(self._configs[base_id], adapter_id)
        return route

    def models_for(self, caller: Caller) -> list[str]:
        return [model_id for model_id in self.model_ids if caller.may_use(self.names[model_id])]

    def adapters_for(self, caller: Caller) -> list[tuple[str, str]]:
        """(adapter id, base model id) of every adapter the key may use, its directory's as they
        are on disk now."""
        return [
            (adapter_id, base_id)
            for base_id, adapters in self._adapters.items()
            for adapter_id in adapters.ids()
            if caller.may_use(_adapter_names(adapter_id, base_id))
        ]


def _adapter_names(adapter_id: str, base_id: str) -> tuple[str, str]:
    return adapter_id, f"{base_id}:{adapter_id}"
