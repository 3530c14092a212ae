"""Model names to routes (`Router`), on plain stand-ins for the models' Serve handles: ids,
aliases, the default for an empty name, and only the models a caller's key may use."""

import hashlib

import pytest

from cluster.schema import ApiKey, ClusterConfig
from serve_app.errors import NotFound
from serve_app.routing.router import Router
from serve_app.tenancy.keys import Caller


class _Handle:
    """Stands for a model's `DeploymentHandle`: notes the options asked and the requests sent."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.options_asked: list[dict] = []
        self.sent: list = []

    def options(self, **options) -> "_Handle":
        self.options_asked.append(options)
        return self

    @property
    def answer(self) -> "_Handle":
        return self

    def remote(self, request):
        self.sent.append(request)
        return f"stream of {self.model_id}"


def _config(default: str | None = None) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "default_model": default,
            "models": [
                {
                    "id": "llama-8b",
                    "aliases": ["llama", "small"],
                    "source": {"path": "/l"},
                    "deployment": {"first_output_timeout_s": 12},
                },
                {"id": "qwen-7b", "aliases": ["qwen"], "source": {"path": "/q"}},
                {"id": "secret-70b", "aliases": ["big"], "source": {"path": "/s"}},
            ],
        }
    )


def _router(default: str | None = None) -> tuple[Router, dict[str, _Handle]]:
    config = _config(default)
    handles = {m.id: _Handle(m.id) for m in config.models}
    return Router(config, handles), handles


def _caller(*models: str) -> Caller:
    return Caller(ApiKey(name="k", sha256=hashlib.sha256(b"t").hexdigest(), models=list(models)))


EVERYONE = Caller(key=None)


@pytest.mark.parametrize(
    "name, model_id",
    [
        ("llama-8b", "llama-8b"),
        ("llama", "llama-8b"),
        ("small", "llama-8b"),
        ("qwen-7b", "qwen-7b"),
        ("qwen", "qwen-7b"),
        ("big", "secret-70b"),
    ],
)
def test_a_model_is_found_by_its_id_or_any_alias(name, model_id):
    router, handles = _router()
    route = router.resolve(name, EVERYONE)
    assert route.model_id == model_id
    assert route.call("request") == f"stream of {model_id}"
    assert handles[model_id].sent == ["request"]
    assert all(not h.sent for other, h in handles.items() if other != model_id)


def test_each_handle_is_made_a_streaming_one_once_not_per_request():
    router, handles = _router()
    for _ in range(3):
        router.resolve("llama", EVERYONE).call("r")
    assert all(h.options_asked == [{"stream": True, "_by_reference": False}] for h in handles.values())


def test_a_route_carries_its_models_first_output_timeout():
    router, _ = _router()
    assert router.resolve("llama", EVERYONE).first_output_timeout_s == 12
    assert router.resolve("qwen", EVERYONE).first_output_timeout_s == 300  # the default


@pytest.mark.parametrize("name", ["", None])
@pytest.mark.parametrize("default, model_id", [(None, "llama-8b"), ("qwen", "qwen-7b"), ("secret-70b", "secret-70b")])
def test_an_empty_name_is_the_default_model(name, default, model_id):
    router, _ = _router(default)
    assert router.resolve(name, EVERYONE).model_id == model_id


def _refusal(router: Router, name: str | None, caller: Caller) -> NotFound:
    with pytest.raises(NotFound) as raised:
        router.resolve(name, caller)
    assert raised.value.status == 404
    return raised.value


def test_an_unknown_model_is_404_listing_only_the_models_the_key_may_use():
    router, _ = _router()
    message = _refusal(router, "gpt-4", _caller("llama-*", "qwen")).message
    assert message.startswith("model 'gpt-4' does not exist")
    assert message.endswith("; available models: llama-8b, llama, small, qwen-7b, qwen")
    assert "secret" not in message and "big" not in message


def test_an_unknown_model_for_a_key_with_none_usable_lists_none():
    router, _ = _router()
    assert _refusal(router, "gpt-4", _caller("no-such-*")).message.endswith("available models: none")


def test_without_auth_an_unknown_model_lists_every_model():
    router, _ = _router()
    message = _refusal(router, "gpt-4", EVERYONE).message
    assert message.endswith("available models: llama-8b, llama, small, qwen-7b, qwen, secret-70b, big")


@pytest.mark.parametrize("name", ["secret-70b", "big"])
def test_a_model_the_key_may_not_use_is_answered_as_one_that_does_not_exist(name):
    """docs/livepeer-contract.md: 404 worded as for an unknown model, so that keys cannot
    discover hidden models (by id or by alias)."""
    router, handles = _router()
    caller = _caller("llama", "qwen-7b")
    hidden = _refusal(router, name, caller).message
    unknown = _refusal(router, "no-such-model", caller).message
    assert hidden.replace(repr(name), "NAME") == unknown.replace(repr("no-such-model"), "NAME")
    assert "secret-70b" not in hidden.replace(repr(name), "")
    assert not handles["secret-70b"].sent


def test_a_default_model_the_key_may_not_use_asks_for_a_name_without_naming_it():
    router, handles = _router("secret-70b")
    for name in ("", None):
        message = _refusal(router, name, _caller("llama")).message
        assert "secret" not in message and "big" not in message
        assert message.endswith("available models: llama-8b, llama, small")
    assert not handles["secret-70b"].sent


def test_a_key_matches_a_model_by_any_of_its_names():
    router, _ = _router()
    assert router.resolve("llama-8b", _caller("small")).model_id == "llama-8b"  # the alias grants the id
    assert router.resolve("", _caller("llama")).model_id == "llama-8b"


@pytest.mark.parametrize(
    "patterns, usable",
    [
        (["*"], ["llama-8b", "qwen-7b", "secret-70b"]),
        (["qwen", "llama-*"], ["llama-8b", "qwen-7b"]),  # in the config's order, not the key's
        (["big"], ["secret-70b"]),
        (["*-7b"], ["qwen-7b"]),
        (["nothing-*"], []),
    ],
)
def test_models_for_a_key_are_those_any_of_whose_names_it_matches(patterns, usable):
    router, _ = _router()
    assert router.models_for(_caller(*patterns)) == usable


def test_models_for_no_key_are_all_and_names_list_id_first():
    router, _ = _router()
    assert router.models_for(EVERYONE) == router.model_ids == ["llama-8b", "qwen-7b", "secret-70b"]
    assert router.names["llama-8b"] == ("llama-8b", "llama", "small")
