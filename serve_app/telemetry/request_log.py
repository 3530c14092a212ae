"""One INFO line per request, written when it ends, with its id, key, model, status, token counts
and timings (and its tenant, cost and the soft budgets it passed, where it has them): the text for
people, and the same fields under `llm_request` for JSON logs."""

import logging

from serve_app.telemetry.record import FinishedRequest

logger = logging.getLogger("ray.serve")


def write(request: FinishedRequest) -> None:
    ttft_ms = None if request.ttft_s is None else round(request.ttft_s * 1000, 1)
    total_ms = round(request.duration_s * 1000, 1)
    fields = {
        "request_id": request.request_id,
        "endpoint": request.endpoint,
        "key": request.key_name,
        "model": request.model,
        "status": request.status,
        "prompt_tokens": request.prompt_tokens,
        "completion_tokens": request.completion_tokens,
        "finish_reason": request.finish_reason,
        "ttft_ms": ttft_ms,
        "total_ms": total_ms,
        "tenant": request.tenant,
        "cost": request.cost,
        "soft_budgets": list(request.soft_budgets),
    }
    extra = "".join(
        f" {name}={value}"
        for name, value in (
            ("tenant", request.tenant),
            ("cost", None if request.cost is None else f"{request.cost:.6g}"),
            ("soft_budgets", ",".join(part.replace(" ", "/") for part in request.soft_budgets) or None),
        )
        if value is not None
    )
    logger.info(
        "request id=%s endpoint=%s key=%s model=%s status=%d prompt_tokens=%d completion_tokens=%d "
        "finish=%s ttft=%s total=%.1fms%s",
        request.request_id,
        request.endpoint,
        request.key_name or "-",
        request.model or "-",
        request.status,
        request.prompt_tokens,
        request.completion_tokens,
        request.finish_reason or "-",
        "-" if ttft_ms is None else f"{ttft_ms}ms",
        total_ms,
        extra,
        extra={"llm_request": fields},
    )
