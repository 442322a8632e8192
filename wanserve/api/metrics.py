"""Prometheus metrics, on a registry of the app's own (no import-time globals)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


class Metrics:
    def __init__(self, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("wanserve_queue_depth", "jobs waiting for the engine", registry=r)
        self.queue.set_function(queue_depth)
        self.jobs = Counter("wanserve_jobs", "jobs by status reached", ["status"], registry=r)
        self.rejected = Counter("wanserve_rejected", "requests refused because the queue was full",
                                registry=r)
        self.step_seconds = Histogram("wanserve_step_seconds", "seconds per denoising step",
                                      ["replica"], buckets=STEP_BUCKETS, registry=r)
        self.job_seconds = Histogram("wanserve_job_seconds",
                                     "seconds from start of generation to a stored MP4",
                                     ["replica"], buckets=JOB_BUCKETS, registry=r)
        self.evicted = Counter("wanserve_evicted", "finished jobs removed to keep the store "
                               "within --max-stored-videos / --max-stored-bytes", registry=r)
        self.replica_jobs = Counter("wanserve_replica_jobs", "jobs each replica started",
                                    ["replica"], registry=r)
        self.cache_steps = Counter("wanserve_cache_steps", "denoising steps of completed jobs, "
                                   "by expert and whether the step cache skipped them",
                                   ["expert", "kind"], registry=r)

    def watch_prompt_cache(self, counts: Callable[[], tuple[int, int]]) -> None:
        """`wanserve_prompt_cache_total{result="hit"|"miss"}`: rank 0's prompt cache
        (wanserve/engine/model/prompt_cache.py), read at each scrape."""
        self.registry.register(_PromptCacheCounts(counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PromptCacheCounts:
    def __init__(self, counts: Callable[[], tuple[int, int]]):
        self._counts = counts

    def collect(self):
        hits, misses = self._counts()
        family = CounterMetricFamily("wanserve_prompt_cache", "texts rank 0 took from its "
                                     "prompt cache (hit) or encoded (miss)", labels=["result"])
        family.add_metric(["hit"], hits)
        family.add_metric(["miss"], misses)
        yield family
