"""The typed shape of a cluster config: the `args` of the Serve application.

Strict (`extra="forbid"`) so that a typo in a YAML key fails at deploy time with the field's path
instead of being silently ignored. No I/O here: a config is validated on whichever node builds the
application, so it must mean the same thing everywhere.

One module per concern; everything is imported from here (`from cluster.schema import X`):

- `sources`: where a model's weights come from (`HubSource`, `PathSource`, `PackageGGUFSource`,
  `PackageArchiveSource`)
- `engine`: the vLLM engine's settings (`EngineSettings`)
- `lora`: LoRA adapters on a base model (`LoraSettings`, `LoraAdapter`, `PackageFolderSource`)
- `deployment`: a model, its replicas, their routing and its price (`ModelConfig`, `DeploymentSettings`,
  `Autoscaling`, `EngineSignals`, `PrefixCacheRouting`, `PrefixEviction`, `SessionRouting`, `Price`,
  `deployment_name`)
- `tenancy`: API keys, tenants, their limits, the rate limiter's failure policy and the usage ledger
  (`AuthConfig`, `ApiKey`, `Tenant`, `KeyLimits`, `SoftBudgets`, `LimiterSettings`, `Scope`, `UsageSettings`)
- `serving`: the ingress and the logs (`IngressSettings`, `LoggingSettings`)
- `config`: the whole config and the rules across its parts (`ClusterConfig`)
- `base`: the strict base model and the patterns of names
"""

from cluster.schema.base import StrictModel
from cluster.schema.config import ClusterConfig
from cluster.schema.deployment import (
    Autoscaling,
    DeploymentSettings,
    EngineSignals,
    ModelConfig,
    PrefixCacheRouting,
    PrefixEviction,
    Price,
    SessionRouting,
    deployment_name,
)
from cluster.schema.engine import EngineSettings
from cluster.schema.lora import LoraAdapter, LoraSettings, PackageFolderSource
from cluster.schema.serving import IngressSettings, LoggingSettings
from cluster.schema.sources import HubSource, ModelSource, PackageArchiveSource, PackageGGUFSource, PathSource
from cluster.schema.tenancy import (
    ApiKey,
    AuthConfig,
    KeyLimits,
    LimiterSettings,
    Scope,
    SoftBudgets,
    Tenant,
    UsageSettings,
)

__all__ = [
    "ApiKey",
    "AuthConfig",
    "Autoscaling",
    "ClusterConfig",
    "DeploymentSettings",
    "EngineSettings",
    "EngineSignals",
    "HubSource",
    "IngressSettings",
    "KeyLimits",
    "LimiterSettings",
    "LoggingSettings",
    "LoraAdapter",
    "LoraSettings",
    "ModelConfig",
    "ModelSource",
    "PackageArchiveSource",
    "PackageFolderSource",
    "PackageGGUFSource",
    "PathSource",
    "PrefixCacheRouting",
    "PrefixEviction",
    "Price",
    "Scope",
    "SessionRouting",
    "SoftBudgets",
    "StrictModel",
    "Tenant",
    "UsageSettings",
    "deployment_name",
]
