"""The ingress deployment: the route table of the Livepeer `/llm`, OpenAI `/v1`, runner and admin
APIs, each route one call through `Admission` into its API's logic.

A request's path: `Admission.serve` opens its lifecycle and checks its token and the route's scope
before the body is read; the API (`apis/livepeer`, `apis/openai`) validates the body, the router
picks the model's handle among those the key may use, `ModelCalls` takes a lease from the rate
limiter and reads the model's first output, which decides between an error status, one JSON body,
or an SSE stream. When the request ends its lifecycle is finished, once: the request log line, the
metrics, the lease's release and the usage ledger's row all hear of it.
"""

from fastapi import Request
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.schema import ClusterConfig
from serve_app.apis.admin import Admin
from serve_app.apis.admin_keys import AdminKeys
from serve_app.apis.admin_registry import RegistryCalls
from serve_app.apis.admin_tenants import AdminTenants
from serve_app.apis.anthropic.serving import AnthropicMessages
from serve_app.apis.livepeer.protocol import LLMResponse
from serve_app.apis.livepeer.serving import LivepeerChat
from serve_app.apis.model_call import ModelCalls
from serve_app.apis.openai.serving import OpenAIAPI
from serve_app.apis.runner import RunnerInfo
from serve_app.http.admission import Admission
from serve_app.http.app import app
from serve_app.http.lifecycle import Listeners
from serve_app.models.bounds import colocated_slots
from serve_app.models.engine import EngineFactory
from serve_app.models.runner import ModelRunner
from serve_app.routing.router import Router
from serve_app.telemetry import request_log
from serve_app.telemetry.metrics import IngressMetrics
from serve_app.tenancy.key_registry import KeyWatch
from serve_app.tenancy.keys import KeyRing
from serve_app.tenancy.ledger_client import LedgerClient
from serve_app.tenancy.limiter import LimitGate


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    async def __init__(
        self,
        config: ClusterConfig,
        handles: dict[str, DeploymentHandle],
        limiter: DeploymentHandle | None = None,
        ledger: DeploymentHandle | None = None,
        registry: DeploymentHandle | None = None,
        colocated_engine: EngineFactory | None = None,
    ) -> None:
        """With `colocated_engine`, the config's one model runs in this replica (no handle); the
        replica is then deployed under the model's deployment name and settings, which
        `models.state` reads the model's state by."""
        self._runners: dict[str, ModelRunner] = {}
        if colocated_engine is not None:
            self._runners = {
                model.id: ModelRunner(model, colocated_engine, colocated_slots(model)) for model in config.models
            }
            for runner in self._runners.values():
                await runner.start()
        router = Router(config, handles | self._runners)
        metrics = IngressMetrics()
        self._ledger = LedgerClient(ledger, config.usage)
        listeners = Listeners(
            routed=(metrics.request_routed,),
            finished=(request_log.write, metrics.request_finished, self._ledger.record),
        )
        keys = KeyRing(config.auth)
        self._key_watch = None if registry is None else KeyWatch(registry, keys)
        if self._key_watch is not None:
            await self._key_watch.start()
        self._admission = Admission(keys, listeners, config.ingress.max_body_bytes)
        gate = LimitGate(limiter, config.auth.limiter, metrics.admitted_unlimited)
        calls = ModelCalls(gate, config.ingress.stream_keepalive_s)
        limit = config.ingress.max_tokens_limit
        self._livepeer = LivepeerChat(router, calls, limit)
        self._openai = OpenAIAPI(router, calls, limit)
        self._anthropic = AnthropicMessages(router, calls, limit)
        self._runner_info = RunnerInfo(config.default_model_id, router.model_ids)
        self._admin = Admin(self._ledger, config.currency)
        names = {name for model in config.models for name in (model.id, *model.aliases)}
        registry_calls = RegistryCalls(self._key_watch, config.currency)
        self._admin_keys = AdminKeys(registry_calls, config.auth.keys, names, gate)
        self._admin_tenants = AdminTenants(registry_calls, config.auth.tenants, config.auth.keys, gate)

    @app.post("/llm", response_model=LLMResponse)
    @app.post("/llm/", include_in_schema=False)
    async def llm(self, request: Request):
        return await self._admission.serve(request, "/llm", "chat", self._livepeer.complete)

    @app.post("/llm/chat/completions")
    async def llm_chat_completions(self, request: Request):
        """The Livepeer runner's newer name for its LLM route, the same route in every way."""
        return await self._admission.serve(request, "/llm/chat/completions", "chat", self._livepeer.complete)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._admission.serve(request, "/v1/chat/completions", "chat", self._openai.chat)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._admission.serve(request, "/v1/completions", "chat", self._openai.completion)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        return await self._admission.serve(request, "/v1/embeddings", "chat", self._openai.embeddings)

    @app.post("/v1/responses")
    async def responses(self, request: Request):
        return await self._admission.serve(request, "/v1/responses", "chat", self._openai.responses)

    @app.post("/v1/messages")
    async def messages(self, request: Request):
        return await self._admission.serve(request, "/v1/messages", "chat", self._anthropic.messages)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(self, request: Request):
        return await self._admission.serve(request, "/v1/messages/count_tokens", "chat", self._anthropic.count_tokens)

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        return await self._admission.serve(request, "/tokenize", "chat", self._openai.tokenize)

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        return await self._admission.serve(request, "/detokenize", "chat", self._openai.detokenize)

    @app.get("/v1/models")
    async def models(self, request: Request):
        return await self._admission.serve(request, "/v1/models", None, self._openai.models)

    @app.get("/v1/models/{name:path}")
    async def model(self, request: Request, name: str):
        return await self._admission.serve(
            request, "/v1/models", None, lambda _, caller, __: self._openai.model(name, caller)
        )

    @app.get("/health")
    async def health(self):
        """Open to all, and not logged: an orchestrator polls it before it registers the runner,
        and then every few seconds."""
        return await self._runner_info.health()

    @app.get("/hardware/info")
    async def hardware(self, request: Request):
        return await self._admission.serve(request, "/hardware/info", None, lambda *_: self._runner_info.hardware())

    @app.get("/hardware/stats")
    async def hardware_stats(self, request: Request):
        return await self._admission.serve(
            request, "/hardware/stats", None, lambda *_: self._runner_info.hardware_stats()
        )

    @app.get("/version")
    async def version(self, request: Request):
        return await self._admission.serve(request, "/version", None, lambda *_: self._runner_info.version())

    @app.get("/admin/usage")
    async def usage(self, request: Request):
        return await self._admission.serve(request, "/admin/usage", "admin", lambda *_: self._admin.usage(request))

    @app.post("/admin/keys", status_code=201)
    async def create_key(self, request: Request):
        return await self._admission.serve(
            request, "/admin/keys", "admin", lambda _, caller, __: self._admin_keys.create(request, caller)
        )

    @app.get("/admin/keys")
    async def list_keys(self, request: Request):
        return await self._admission.serve(request, "/admin/keys", "admin", lambda *_: self._admin_keys.all())

    @app.get("/admin/keys/{name}")
    async def show_key(self, request: Request, name: str):
        return await self._admission.serve(request, "/admin/keys", "admin", lambda *_: self._admin_keys.show(name))

    @app.patch("/admin/keys/{name}")
    async def update_key(self, request: Request, name: str):
        return await self._admission.serve(
            request, "/admin/keys", "admin", lambda _, caller, __: self._admin_keys.update(request, caller, name)
        )

    @app.post("/admin/keys/{name}/rotate")
    async def rotate_key(self, request: Request, name: str):
        return await self._admission.serve(
            request, "/admin/keys", "admin", lambda _, caller, __: self._admin_keys.rotate(request, caller, name)
        )

    @app.delete("/admin/keys/{name}")
    async def delete_key(self, request: Request, name: str):
        return await self._admission.serve(
            request, "/admin/keys", "admin", lambda _, caller, __: self._admin_keys.delete(caller, name)
        )

    @app.post("/admin/tenants", status_code=201)
    async def create_tenant(self, request: Request):
        return await self._admission.serve(
            request, "/admin/tenants", "admin", lambda _, caller, __: self._admin_tenants.create(request, caller)
        )

    @app.get("/admin/tenants")
    async def list_tenants(self, request: Request):
        return await self._admission.serve(request, "/admin/tenants", "admin", lambda *_: self._admin_tenants.all())

    @app.get("/admin/tenants/{name}")
    async def show_tenant(self, request: Request, name: str):
        return await self._admission.serve(
            request, "/admin/tenants", "admin", lambda *_: self._admin_tenants.show(name)
        )

    @app.patch("/admin/tenants/{name}")
    async def update_tenant(self, request: Request, name: str):
        return await self._admission.serve(
            request, "/admin/tenants", "admin", lambda _, caller, __: self._admin_tenants.update(request, caller, name)
        )

    @app.delete("/admin/tenants/{name}")
    async def delete_tenant(self, request: Request, name: str):
        return await self._admission.serve(
            request, "/admin/tenants", "admin", lambda _, caller, __: self._admin_tenants.delete(caller, name)
        )

    @app.get("/admin/audit")
    async def audit(self, request: Request):
        return await self._admission.serve(request, "/admin/audit", "admin", lambda *_: self._admin_keys.audit(request))

    async def check_health(self) -> None:
        """Serve calls this periodically; a failing colocated engine gets the replica replaced."""
        for runner in self._runners.values():
            await runner.check_health()

    def num_unfinished_requests(self) -> int:
        return sum(runner.num_unfinished_requests() for runner in self._runners.values())

    async def __del__(self) -> None:
        """Serve awaits this on a graceful stop, once requests have drained (its ingress wrapper
        awaits a coroutine `__del__`, and only calls a plain one): the ledger rows this replica
        holds are stored before it goes."""
        if getattr(self, "_key_watch", None) is not None:
            self._key_watch.stop()
        if hasattr(self, "_ledger"):
            await self._ledger.close()
        for runner in getattr(self, "_runners", {}).values():
            runner.shutdown()
