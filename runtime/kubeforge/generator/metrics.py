"""The generator's Prometheus metrics, fed by vLLM's per-step statistics and by the weight updates.

Token counts and queue depth come from a vLLM stat logger, so they count every request the
engine serves: /generate and the OpenAI endpoints alike.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from kubeforge.serving import ROLE_LABELS

GENERATED_TOKENS = Counter(
    "kubeforge_generator_generated_tokens",
    "Tokens sampled by the engine (rate() of it is tokens per second).",
    ROLE_LABELS,
)
PROMPT_TOKENS = Counter("kubeforge_generator_prompt_tokens", "Prompt tokens the engine processed.", ROLE_LABELS)
QUEUE_DEPTH = Gauge(
    "kubeforge_generator_queue_depth",
    "Requests in the engine: running plus waiting, from vLLM's scheduler.",
    ROLE_LABELS,
)
RUNNING = Gauge("kubeforge_generator_running_requests", "Requests vLLM's scheduler is running.", ROLE_LABELS)
WAITING = Gauge("kubeforge_generator_waiting_requests", "Requests waiting in vLLM's scheduler.", ROLE_LABELS)
IN_FLIGHT = Gauge("kubeforge_generator_inflight_requests", "/generate requests being answered.", ROLE_LABELS)
POLICY_VERSION = Gauge("kubeforge_generator_policy_version", "Policy version of the served weights.", ROLE_LABELS)
WEIGHT_UPDATE_SECONDS = Histogram(
    "kubeforge_generator_weight_update_seconds",
    "Wall time of a weight update, generation paused throughout.",
    ROLE_LABELS,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
WEIGHT_UPDATE_BYTES = Counter("kubeforge_generator_weight_update_bytes", "Weight bytes received.", ROLE_LABELS)


def stat_logger_factory(labels: dict[str, str]):
    """A vLLM StatLoggerFactory whose loggers feed the metrics above (with this role's labels)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class KubeforgeStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index
            # Bound once: record() runs every engine step, and a labels() lookup per metric per step
            # was a visible share of the serving process's CPU (docs/benchmarks.md, B3).
            self.generated, self.prompt = GENERATED_TOKENS.labels(**labels), PROMPT_TOKENS.labels(**labels)
            self.running, self.waiting = RUNNING.labels(**labels), WAITING.labels(**labels)
            self.queue_depth = QUEUE_DEPTH.labels(**labels)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if iteration_stats is not None:
                self.generated.inc(iteration_stats.num_generation_tokens)
                self.prompt.inc(iteration_stats.prompt_token_stats.total)
            if scheduler_stats is not None:
                running, waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
                self.running.set(running)
                self.waiting.set(waiting)
                self.queue_depth.set(running + waiting)

        def log_engine_initialized(self):
            pass

    return KubeforgeStatLogger
