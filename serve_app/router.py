"""Model name (id or alias, or empty for the default) to the model's streaming handle."""

from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from cluster.schema import ClusterConfig
from serve_app.errors import NotFound


@dataclass(frozen=True)
class Route:
    model_id: str
    handle: DeploymentHandle
    first_output_timeout_s: float


class Router:
    def __init__(self, config: ClusterConfig, handles: dict[str, DeploymentHandle]) -> None:
        # One streaming handle per model, made once: `.options()` per request is costly.
        self._routes = {
            m.id: Route(m.id, handles[m.id].options(stream=True), m.deployment.first_output_timeout_s)
            for m in config.models
        }
        self._names = {name: m.id for m in config.models for name in (m.id, *m.aliases)}
        self._default = config.default_model_id
        self.model_ids = [m.id for m in config.models]
        self.aliases = {m.id: m.aliases for m in config.models}

    def resolve(self, name: str | None) -> Route:
        model_id = self._names.get(name) if name else self._default
        if model_id is None:
            raise NotFound(f"model {name!r} does not exist; available models: {', '.join(self._names)}")
        return self._routes[model_id]
