"""The KubeRay manifest a config file renders into, for files that leave Serve's HTTP options to
Serve and for ones that set them."""

from importlib.metadata import version

import yaml

from cluster import render
from cluster.load import load

CONFIG = """\
{http}applications:
  - name: llm
    route_prefix: /
    import_path: serve_app.app:build_app
    args:
      models:
        - id: m
          source: {{hf: org/m}}
          deployment: {{num_gpus: 1}}
"""


def _manifest(tmp_path, http: str = "") -> tuple[dict, dict, dict]:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(http=http))
    manifest = render.kuberay(load(path), name="llm", image="img")
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return manifest, serve_config, {port["name"]: port["containerPort"] for port in head["ports"]}


def test_a_file_without_http_options_listens_on_every_interface_of_its_pod(tmp_path):
    _, serve_config, ports = _manifest(tmp_path)
    assert serve_config["http_options"] == {"host": "0.0.0.0"}
    assert ports["serve"] == 8000


def test_a_files_own_http_options_are_kept_but_for_its_host(tmp_path):
    _, serve_config, ports = _manifest(tmp_path, "http_options: {host: 127.0.0.1, port: 9000}\n")
    assert serve_config["http_options"] == {"host": "0.0.0.0", "port": 9000}
    assert ports["serve"] == 9000


def test_the_manifest_names_the_installed_ray(tmp_path):
    manifest, _, _ = _manifest(tmp_path)
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == version("ray")
