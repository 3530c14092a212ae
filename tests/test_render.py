"""The KubeRay manifest a config file renders into, for files that leave Serve's HTTP options to
Serve and for ones that set them."""

import json
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


PINNED = """\
applications:
  - name: llm
    route_prefix: /
    import_path: serve_app.app:build_app
    args:
      models:
        - id: free
          source: {hf: org/free}
          deployment: {num_gpus: 1, num_replicas: 2}
        - id: pinned
          source: {hf: org/pinned}
          engine: {tensor_parallel_size: 2}
          deployment: {num_gpus: 1, resources: {pool_a: 1}, autoscaling: {min_replicas: 1, max_replicas: 3}}
        - id: small
          source: {hf: org/small}
          deployment: {num_gpus: 1, resources: {pool_a: 0.5}}
"""


def _declared(group: dict) -> dict:
    """`ray start --resources` as KubeRay's rayStartParams spells it, read back."""
    quoted = group["rayStartParams"]["resources"]
    assert quoted.startswith('"') and quoted.endswith('"')
    return json.loads(quoted[1:-1].replace('\\"', '"'))


def test_models_pinned_to_custom_resources_get_a_worker_group_whose_nodes_declare_them(tmp_path):
    """Without it no node declares the resource and the pinned model is never placed."""
    path = tmp_path / "config.yaml"
    path.write_text(PINNED)
    manifest = render.kuberay(load(path), name="llm", image="img")
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "gpu-pool-a"}
    assert "resources" not in groups["gpu"]["rayStartParams"]
    # Nodes of two GPUs: the free model's two replicas fill one; the pinned group holds one TP-2
    # replica per node (1 to 3 nodes) and the small model's one replica with room for another.
    assert (groups["gpu"]["minReplicas"], groups["gpu"]["maxReplicas"]) == (1, 1)
    assert (groups["gpu-pool-a"]["minReplicas"], groups["gpu-pool-a"]["maxReplicas"]) == (2, 4)
    # One unit per node covers one TP-2 replica (1 x 1) and two of the small one (0.5 x 2).
    assert _declared(groups["gpu-pool-a"]) == {"pool_a": 1}
