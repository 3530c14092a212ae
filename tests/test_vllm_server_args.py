"""`extra_args` refuses the flags of vLLM's own HTTP server at validation, naming the file, the
field and the flags, and the refused list is vLLM's own: read off its parser here, so that a
vLLM upgrade that adds a server flag fails this test rather than passing the flag silently."""

import dataclasses

import pytest
import yaml

from cluster.load import ConfigError, load
from cluster.schema import ClusterConfig
from cluster.schema.engine import VLLM_SERVER_ARGS
from serve_app.models.engine import vllm_namespace


def _dests(parser) -> set[str]:
    return {action.dest for action in parser._actions}


def test_the_refused_flags_are_those_only_vllms_server_reads():
    """`vllm serve`'s parser less the engine's arguments and the front end's that its chat
    serving layer reads (`BaseFrontendArgs`: chat template, tool parsers, …), which do apply here."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import BaseFrontendArgs, make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    served = _dests(make_arg_parser(FlexibleArgumentParser()))
    engine = _dests(AsyncEngineArgs.add_cli_args(FlexibleArgumentParser()))
    front_end = {field.name for field in dataclasses.fields(BaseFrontendArgs)}
    assert served - engine - front_end == VLLM_SERVER_ARGS


def _config_file(tmp_path, extra_args: dict):
    path = tmp_path / "serve.yaml"
    model = {"id": "m", "source": {"hf": "org/m"}, "engine": {"extra_args": extra_args}}
    app = {"name": "llm", "import_path": "serve_app.app:build_app", "args": {"models": [model]}}
    path.write_text(yaml.safe_dump({"applications": [app]}))
    return path


@pytest.mark.parametrize(
    "extra_args, named",
    [
        ({"api_key": ["sk-1"]}, "api_key"),
        ({"host": "0.0.0.0", "port": 9000, "max_num_batched_tokens": "8k"}, "host, port"),
        ({"ssl_certfile": "/c.pem", "allowed_origins": ["*"], "middleware": ["m.x"]}, "allowed_origins, middleware, "),
    ],
)
def test_server_flags_are_refused_naming_the_file_field_and_flags(tmp_path, extra_args, named):
    path = _config_file(tmp_path, extra_args)
    with pytest.raises(ConfigError) as raised:
        load(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: applications[0].args: invalid config:\n")
    assert f"models.0.engine.extra_args: {named}" in message
    assert "flags of vLLM's own HTTP server, which does not run here" in message
    assert "API keys are set under auth.keys" in message


def test_the_front_end_flags_the_chat_layer_reads_still_pass():
    extra_args = {
        "chat_template_content_format": "openai",
        "enable_auto_tool_choice": True,
        "tool_call_parser": "hermes",
    }
    config = ClusterConfig.model_validate(
        {"models": [{"id": "m", "source": {"hf": "org/m"}, "engine": {"extra_args": extra_args}}]}
    )
    args = vllm_namespace("m", "/models/m", config.models[0].engine.to_vllm_args())
    assert (args.chat_template_content_format, args.enable_auto_tool_choice, args.tool_call_parser) == (
        "openai",
        True,
        "hermes",
    )
