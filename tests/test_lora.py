"""LoRA adapters without Ray: the config's rules, adapters found by id in the config or in the
adapter directory (at request time, safely), and their routes: the base model's handle with the
adapter as Serve's multiplexed model id, the adapter's own id for the ledger, the key's
allow-list over both of its names."""

import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.schema import ApiKey, ClusterConfig
from serve_app.errors import NotFound
from serve_app.models.adapters import Adapters
from serve_app.routing.router import Router
from serve_app.tenancy.keys import Caller
from tests.test_router import _Handle

EVERYONE = Caller(key=None)


def _adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def _config(tmp_path: Path, **lora) -> ClusterConfig:
    lora = {"adapters": [{"id": "pirate", "source": {"path": str(tmp_path / "pirate")}}]} | lora
    return ClusterConfig.model_validate(
        {
            "models": [
                {"id": "base", "aliases": ["b"], "source": {"path": "/b"}, "lora": lora},
                {"id": "other", "source": {"path": "/o"}},
            ]
        }
    )


def _caller(*models: str) -> Caller:
    return Caller(ApiKey(name="k", sha256=hashlib.sha256(b"t").hexdigest(), models=list(models)))


def test_the_config_refuses_lora_where_it_cannot_be_routed_or_named(tmp_path):
    base = {"id": "m", "source": {"path": "/m"}}
    with pytest.raises(ValidationError, match="needs the model in a deployment of its own"):
        ClusterConfig.model_validate(
            {"ingress": {"colocate": True}, "models": [base | {"lora": {"directory": str(tmp_path)}}]}
        )
    with pytest.raises(ValidationError, match="name adapters, a directory of adapters, or both"):
        ClusterConfig.model_validate({"models": [base | {"lora": {}}]})
    with pytest.raises(ValidationError, match="duplicate model id, alias or adapter id 'm'"):
        ClusterConfig.model_validate(
            {"models": [base | {"lora": {"adapters": [{"id": "m", "source": base["source"]}]}}]}
        )


def test_vllm_keeps_as_many_adapters_loaded_as_a_replica_may(tmp_path):
    lora = _config(tmp_path, max_loaded=2, max_rank=8).models[0].lora
    assert lora.to_vllm_args() == {"enable_lora": True, "max_loras": 2, "max_cpu_loras": 2, "max_lora_rank": 8}


def test_directory_adapters_are_found_when_named_and_only_safe_names(tmp_path):
    _adapter(tmp_path / "adapters" / "sailor")
    (tmp_path / "adapters" / "not-an-adapter").mkdir()
    adapters = Adapters(_config(tmp_path, directory=str(tmp_path / "adapters")).models[0].lora)
    assert adapters.path("pirate") == str(tmp_path / "pirate")  # from the config, whatever is on disk
    assert adapters.path("sailor") == str(tmp_path / "adapters" / "sailor")
    assert adapters.ids() == ["pirate", "sailor"]
    for name in ("not-an-adapter", "..", "../adapters/sailor", ".hidden", "nobody"):
        assert adapters.path(name) is None
    _adapter(tmp_path / "adapters" / "captain")  # copied in while serving
    assert adapters.path("captain") is not None and adapters.ids() == ["pirate", "captain", "sailor"]


def test_an_adapter_is_routed_to_its_base_by_either_name_as_itself(tmp_path):
    config = _config(tmp_path)
    handles = {m.id: _Handle(m.id) for m in config.models}
    router = Router(config, handles)
    for name in ("pirate", "base:pirate", "b:pirate"):
        route = router.resolve(name, EVERYONE)
        assert (route.model_id, route.parent) == ("pirate", "base")
        assert route.call("request") == "stream of base"
    # One streaming handle for the adapter, made once, with the adapter as the multiplexed model id.
    assert handles["base"].options_asked == [
        {"stream": True, "_by_reference": False},
        {"stream": True, "_by_reference": False, "multiplexed_model_id": "pirate"},
    ]
    assert router.resolve("base", EVERYONE).parent is None
    assert router.adapters_for(EVERYONE) == [("pirate", "base")]


def test_a_key_uses_an_adapter_only_if_its_allow_list_names_it(tmp_path):
    router = Router(_config(tmp_path), {"base": _Handle("base"), "other": _Handle("other")})
    assert router.resolve("pirate", _caller("pirate")).model_id == "pirate"
    assert router.resolve("pirate", _caller("base:*")).model_id == "pirate"
    with pytest.raises(NotFound) as refused:
        router.resolve("pirate", _caller("base"))  # the base model, not its adapters
    assert refused.value.message.endswith("available models: base, b")
    assert router.adapters_for(_caller("base")) == []


def test_an_unknown_adapter_is_404_naming_the_available_ones(tmp_path):
    router = Router(_config(tmp_path), {"base": _Handle("base"), "other": _Handle("other")})
    for name in ("captain", "base:captain", "other:pirate"):
        with pytest.raises(NotFound) as refused:
            router.resolve(name, EVERYONE)
        assert refused.value.message.endswith("available models: base, b, other, pirate")


def test_an_adapter_found_under_two_bases_is_each_bases_own(tmp_path):
    for base in ("one", "two"):
        _adapter(tmp_path / base / "shared")
    config = ClusterConfig.model_validate(
        {
            "models": [
                {"id": base, "source": {"path": f"/{base}"}, "lora": {"directory": str(tmp_path / base)}}
                for base in ("one", "two")
            ]
        }
    )
    handles = {m.id: _Handle(m.id) for m in config.models}
    router = Router(config, handles)
    assert router.resolve("one:shared", EVERYONE).call("r") == "stream of one"
    assert router.resolve("two:shared", EVERYONE).call("r") == "stream of two"  # not the cached one's
    with pytest.raises(NotFound):
        router.resolve("two:shared", _caller("one:shared"))


def test_an_adapter_id_takes_no_colon(tmp_path):
    with pytest.raises(ValidationError, match=r"adapters\.0\.id"):
        _config(tmp_path, adapters=[{"id": "org:tuned", "source": {"path": "/t"}}])
