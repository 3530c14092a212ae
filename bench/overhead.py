"""The application builder for the ingress-overhead run: our whole stack (auth, routing, Serve
handles, SSE framing) over the zero-cost test engine from `tests/`, which streams the prompt's
words back at once. Whatever latency remains is ours."""

from ray.serve import Application

from cluster.schema import ClusterConfig
from serve_app.app import build_graph
from tests.fake_engine import fake_engine


def build_app(args: ClusterConfig) -> Application:
    return build_graph(args, fake_engine)
