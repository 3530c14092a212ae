"""Model name (id or alias, or empty for the default) to the model's streaming handle."""

from ray.serve.handle import DeploymentHandle

from cluster.schema import ClusterConfig
from serve_app.errors import NotFound


class Router:
    def __init__(self, config: ClusterConfig, handles: dict[str, DeploymentHandle]) -> None:
        # One streaming handle per model, made once: `.options()` per request is costly.
        self._handles = {model_id: handle.options(stream=True) for model_id, handle in handles.items()}
        self._names = {name: m.id for m in config.models for name in (m.id, *m.aliases)}
        self._default = config.default_model_id
        self.model_ids = [m.id for m in config.models]

    def resolve(self, name: str | None) -> tuple[str, DeploymentHandle]:
        model_id = self._names.get(name) if name else self._default
        if model_id is None:
            raise NotFound(f"model {name!r} does not exist; available models: {', '.join(self._names)}")
        return model_id, self._handles[model_id]
