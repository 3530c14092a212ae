"""Handle calls that must outlive the request that makes them.

Serve treats a handle call made while serving a request as that request's child, and cancels
children when the request is cancelled, as it is when its client leaves. A lease release or a
ledger row sent as such a request ends would then be lost, so they are sent from an empty
context, where they are nobody's children. The response is returned for a caller that must know
the call succeeded; awaited under `asyncio.shield`, its caller's cancellation cannot reach it.
"""

import contextvars
from typing import Any

from ray.serve.handle import DeploymentHandle, DeploymentResponse


def call(handle: DeploymentHandle, method: str, *args: Any) -> DeploymentResponse:
    return contextvars.Context().run(lambda: getattr(handle, method).remote(*args))
