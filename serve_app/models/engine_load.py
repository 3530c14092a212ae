"""What vLLM's scheduler last told of its load: a stat logger of our own, which vLLM hands the
scheduler's stats after every engine step, beside the one that exports vLLM's metrics. Imported
by the engine once vLLM is loaded (vLLM's metrics modules take seconds to import)."""

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats


class SchedulerLoad(StatLoggerBase):
    """The last `SchedulerStats` of one engine core."""

    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        self.last = SchedulerStats()

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: MultiModalCacheStats | None = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self.last = scheduler_stats

    def log_engine_initialized(self) -> None:
        return None
