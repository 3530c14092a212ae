"""The Serve application builder named by every config's `import_path`.

Keep `from __future__ import annotations` out of this module: Ray validates a config's `args`
against the `ClusterConfig` annotation only when it is a real class.
"""

from typing import Any

from ray import serve
from ray.serve import Application

from cluster.schema import ClusterConfig
from serve_app.ingress import Ingress
from serve_app.models.deployment import ModelServer, colocated_options, deployment_options
from serve_app.models.engine import EngineFactory, vllm_engine, vllm_namespace
from serve_app.routing.policies import request_router_options
from serve_app.tenancy.database import single_writer_actor_options
from serve_app.tenancy.key_registry import KeyRegistry, registry_options
from serve_app.tenancy.ledger import UsageLedger, ledger_options
from serve_app.tenancy.limiter import LIMITER_OPTIONS, RateLimiter

DRAIN_CHECK_S = 0.5
"""How often a stopping replica asks whether its requests are done. Serve sleeps this long before
it first asks, so its default (2 s) is the least any replica takes to stop, an idle one included:
every redeploy, scale-down and `serve shutdown` waited it out."""


def build_app(args: ClusterConfig) -> Application:
    for model in args.models:
        # Fails the deploy now, naming the argument, rather than each replica at start-up.
        vllm_namespace(model.id, model.id, model.engine.to_vllm_args())
    return build_graph(args, vllm_engine)


def build_graph(config: ClusterConfig, engine_factory: EngineFactory) -> Application:
    """One deployment per model, the rate limiter if a key or tenant may have limits, the usage ledger unless
    it is off, the key registry where keys are made at runtime, and the ingress holding a handle
    to each; or, colocated, the ingress holding the one model's engine, deployed under the model's
    name and settings."""
    common = {"logging_config": config.logging.serve_logging_config(), "graceful_shutdown_wait_loop_s": DRAIN_CHECK_S}
    models = (
        {}
        if config.ingress.colocate
        else {
            model.id: serve.deployment(
                ModelServer,
                **deployment_options(model),
                **request_router_options(model),
                **common,
            ).bind(model, engine_factory)
            for model in config.models
        }
    )
    limiter = None
    holders = (*config.auth.keys, *config.auth.tenants)
    if config.auth.store_enabled or any(holder.limits.any for holder in holders):
        ledger_database = config.usage.database if config.usage.enabled else None
        limiter = serve.deployment(RateLimiter, **LIMITER_OPTIONS, **common).bind(ledger_database, config.currency)
    registry = None
    if config.auth.store_enabled:
        options = registry_options(single_writer_actor_options(config.usage.database))
        registry = serve.deployment(KeyRegistry, **options, **common).bind(
            config.usage.database,
            [key.name for key in config.auth.keys],
            [tenant.name for tenant in config.auth.tenants],
        )
    ledger = None
    if config.usage.enabled:
        ledger = serve.deployment(UsageLedger, **ledger_options(config.usage), **common).bind(config.usage.database)
    if config.ingress.colocate:
        options = colocated_options(config.models[0])
        return Ingress.options(**options, **common).bind(
            config, {}, limiter, ledger, registry, colocated_engine=engine_factory
        )
    return Ingress.options(**ingress_options(config), **common).bind(config, models, limiter, ledger, registry)


def ingress_options(config: ClusterConfig) -> dict[str, Any]:
    """Serve options for the ingress when the models have deployments of their own."""
    ingress = config.ingress
    sizing = (
        {"num_replicas": ingress.num_replicas}
        if ingress.num_replicas is not None
        else {"autoscaling_config": ingress.autoscaling.model_dump()}
    )
    return sizing | {
        "max_ongoing_requests": ingress.max_ongoing_requests,
        # Its streams are the models' streams, and it stores its held usage rows as it stops.
        "graceful_shutdown_timeout_s": max(model.deployment.graceful_shutdown_timeout_s for model in config.models),
        "ray_actor_options": {"num_cpus": ingress.num_cpus},
    }
