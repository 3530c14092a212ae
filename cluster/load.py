"""Read a Serve config file and validate the `args` of each of our applications, with errors that
name the file and the path of the bad field."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.schema import ClusterConfig

IMPORT_PATH = "serve_app.app:build_app"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class LoadedConfig:
    path: Path
    serve_config: dict[str, Any]
    apps: dict[str, ClusterConfig]


def load(path: str | Path) -> LoadedConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("applications"), list):
        raise ConfigError(f"{path}: a Serve config file needs an 'applications' list")
    apps = {}
    for index, app in enumerate(raw["applications"]):
        if not isinstance(app, dict) or app.get("import_path") != IMPORT_PATH:
            continue
        where = f"applications[{index}].args"
        _check_json(app.get("args") or {}, f"{path}: {where}")
        apps[app.get("name", "default")] = validate(app.get("args") or {}, f"{path}: {where}")
    if not apps:
        raise ConfigError(f"{path}: no application has import_path {IMPORT_PATH!r}")
    return LoadedConfig(path=path, serve_config=raw, apps=apps)


def _check_json(value: Any, where: str) -> None:
    """`serve deploy` sends the file to Ray's dashboard as JSON, and YAML reads an unquoted date or
    time (`expires_at: 2027-06-30`) as a date object, which JSON cannot carry: `serve run` would
    accept the file and `serve deploy` fail with a TypeError."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{where}.{index}")
    elif not isinstance(value, (str, int, float, bool, type(None))):
        raise ConfigError(
            f"{where}: YAML reads {value} as a {type(value).__name__}, which a Serve config "
            "cannot carry: put it in quotes"
        )


def validate(args: dict[str, Any], where: str) -> ClusterConfig:
    try:
        return ClusterConfig.model_validate(args)
    except ValidationError as error:
        raise ConfigError(f"{where}: invalid config:\n{describe(error)}") from None


def describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {field}: {item['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)
