"""The whole config, the `args` of the Serve application, and the rules across its parts: names
unique and resolvable, keys' models known, colocation with one model (routed by Serve's proxy and
scaled on Serve's count of requests)."""

from pydantic import Field, model_validator

from cluster.schema.base import StrictModel, reject_duplicates
from cluster.schema.deployment import ModelConfig, deployment_name
from cluster.schema.serving import IngressSettings, LoggingSettings
from cluster.schema.tenancy import AuthConfig, UsageSettings


class ClusterConfig(StrictModel):
    """The `args` of the Serve application whose `import_path` is `serve_app.app:build_app`."""

    models: list[ModelConfig] = Field(
        min_length=1,
        description="the models served, each its own Serve deployment; ids and aliases unique across them",
    )
    default_model: str | None = Field(
        default=None,
        description='served when a request names no model (or `""`), and the one `/health` and `/version` '
        "report; an id or alias; the first model if unset",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys")
    ingress: IngressSettings = Field(default_factory=IngressSettings, description="the HTTP front deployment")
    usage: UsageSettings = Field(default_factory=UsageSettings, description="the usage ledger")
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="every deployment's logs")

    @model_validator(mode="after")
    def _names_resolve(self) -> "ClusterConfig":
        names = [name for model in self.models for name in (model.id, *model.aliases)]
        adapters = [adapter.id for model in self.models if model.lora for adapter in model.lora.adapters]
        reject_duplicates("model id, alias or adapter id", names + adapters)
        deployments: dict[str, str] = {}
        for model in self.models:
            name = deployment_name(model.id)
            other = deployments.setdefault(name, model.id)
            if other != model.id:
                raise ValueError(
                    f"model ids {other!r} and {model.id!r} would share the Serve deployment name {name!r}: rename one"
                )
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(
                f"default_model {self.default_model!r} is not a model id or alias (models: {', '.join(names)})"
            )
        for index, key in enumerate(self.auth.keys):
            for pattern in key.models:
                # A plain name is a promise about this config; a glob may be about models to come.
                if not _is_glob(pattern) and pattern not in names + adapters:
                    raise ValueError(
                        f"auth.keys.{index}.models: {pattern!r} is not a model id, alias or adapter id "
                        f"(models: {', '.join(names + adapters)}; glob patterns like 'llama-*' are allowed)"
                    )
        self._prices_agree()
        if self.ingress.colocate:
            if len(self.models) != 1:
                raise ValueError(f"ingress.colocate needs exactly one model, not {len(self.models)}")
            scaling = self.models[0].deployment.autoscaling
            if scaling is not None and scaling.min_replicas == 0:
                raise ValueError(
                    "ingress.colocate: the model cannot scale to zero (autoscaling.min_replicas: 0), "
                    "or nothing would answer /health"
                )
            if self.models[0].routing is not None:
                raise ValueError(
                    "ingress.colocate: a colocated model's requests are routed by Serve's HTTP proxy, which "
                    "reads neither the prompt nor the session: drop `routing` or set colocate: false"
                )
            if self.models[0].lora is not None:
                raise ValueError(
                    "ingress.colocate: LoRA adapters are routed by Serve's model multiplexing, which needs the "
                    "model in a deployment of its own: drop `lora` or set colocate: false"
                )
            if scaling is not None and scaling.engine_signals is not None:
                raise ValueError(
                    "ingress.colocate: autoscaling.engine_signals needs the model in a deployment of its own "
                    "(its replicas report the engine's signals): drop it or set colocate: false"
                )
        return self

    def _prices_agree(self) -> None:
        """Spend is summed across models, so their prices must be in one currency."""
        currencies = {model.price.currency for model in self.models if model.price is not None}
        if len(currencies) > 1:
            raise ValueError(f"models' prices are in {', '.join(sorted(currencies))}: use one currency")
        holders = [("auth.keys", key.name, key.limits) for key in self.auth.keys]
        holders += [("auth.tenants", tenant.name, tenant.limits) for tenant in self.auth.tenants]
        for where, name, limits in holders:
            if limits.has_spend and not currencies:
                raise ValueError(f"{where} {name!r}: spend budgets need a `price` on at least one model")

    @property
    def currency(self) -> str | None:
        return next((model.price.currency for model in self.models if model.price is not None), None)

    @property
    def default_model_id(self) -> str:
        wanted = self.default_model or self.models[0].id
        return next(m.id for m in self.models if wanted in (m.id, *m.aliases))


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")
