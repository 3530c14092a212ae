"""Model name (id or alias, or empty for the default) to the call that streams the model's
outputs for a request of any API, within the models the caller's key may use."""

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from ray.serve.handle import DeploymentHandle

from cluster.schema import ClusterConfig, ModelConfig, Price
from serve_app.errors import NotFound
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


def _call(model: DeploymentHandle | ModelRunner, by_session: bool) -> Callable[[EngineRequest], ModelStream]:
    if isinstance(model, ModelRunner):
        return lambda request: InProcessStream(model.answer(request))
    # One streaming handle per model, made once: `.options()` per request is costly. Calls go
    # over Serve's gRPC transport rather than Ray actor calls, which cost more per request and
    # per token through the ingress (docs/benchmarks.md, "Ingress overhead alone").
    answer = model.options(stream=True, _by_reference=False).answer
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
        self._routes = {
            m.id: Route(
                m.id,
                _call(models[m.id], _by_session(m)),
                m.deployment.first_output_timeout_s,
                m.price,
                m.engine.max_model_len,
            )
            for m in config.models
        }
        self._ids = {name: m.id for m in config.models for name in (m.id, *m.aliases)}
        self._default = config.default_model_id
        self.model_ids = [m.id for m in config.models]
        self.names = {m.id: (m.id, *m.aliases) for m in config.models}

    def resolve(self, name: str | None, caller: Caller) -> Route:
        """A model the key may not use is answered as one that does not exist, with the list of
        those the key may use and no others, so that keys cannot discover hidden models
        (docs/livepeer-contract.md)."""
        model_id = self._ids.get(name) if name else self._default
        if model_id is None or not caller.may_use(self.names[model_id]):
            usable = ", ".join(n for usable_id in self.models_for(caller) for n in self.names[usable_id]) or "none"
            if not name:
                raise NotFound(
                    f"name a model: the default model is not one this key may use; available models: {usable}"
                )
            raise NotFound(f"model {name!r} does not exist or you do not have access to it; available models: {usable}")
        return self._routes[model_id]

    def models_for(self, caller: Caller) -> list[str]:
        return [model_id for model_id in self.model_ids if caller.may_use(self.names[model_id])]
