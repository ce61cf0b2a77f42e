"""Our metrics, next to Ray Serve's own ``ray_serve_*``.

Recorded with ``ray.serve.metrics`` in whichever replica sees the event (the Gateway for
sessions, jobs and job stages; the model deployments for encode/decode/parse and their GPU
memory), aggregated by Ray's metrics agent and exported on ``ray.init(_metrics_export_port=…)``
with a ``ray_`` prefix: ``ray_atelier_stage_latency_ms``, ``ray_atelier_embedding_cache_total``,
``ray_atelier_gateway_embedding_total``, ``ray_atelier_active_sessions``, ``ray_atelier_jobs``,
``ray_atelier_gpu_memory_bytes``.
Ray adds the deployment, replica and application tags itself. (``prometheus_client`` alone
would only see one process.)
"""

from __future__ import annotations

from functools import cache

from ray.serve import metrics

# From a 5 ms click to a multi-minute mesh on a CPU.
LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000,
                         60_000, 300_000]


@cache
def _stage_latency() -> metrics.Histogram:
    return metrics.Histogram(
        "atelier_stage_latency_ms",
        "Time of one stage: encode, decode, parse, and each step/stage of edit and mesh jobs",
        boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("stage",))


@cache
def _embedding_cache() -> metrics.Counter:
    return metrics.Counter("atelier_embedding_cache_total",
                           "Decoder lookups of an image embedding, by hit or miss",
                           tag_keys=("result",))


@cache
def _gateway_embedding() -> metrics.Counter:
    return metrics.Counter(
        "atelier_gateway_embedding_total",
        "Gateway lookups of a session's embedding reference: hit (held by this replica) or miss "
        "(re-encoded from the image: evicted, lost, or the session came from another replica)",
        tag_keys=("result",))


@cache
def _active_sessions() -> metrics.Gauge:
    return metrics.Gauge("atelier_active_sessions", "Live sessions in this Gateway replica")


@cache
def _jobs() -> metrics.Gauge:
    return metrics.Gauge("atelier_jobs", "Jobs of a kind waiting or running in this Gateway",
                         tag_keys=("kind", "state"))


@cache
def _gpu_memory() -> metrics.Gauge:
    return metrics.Gauge("atelier_gpu_memory_bytes",
                         "torch's allocated CUDA memory in this model replica",
                         tag_keys=("model",))


def observe_stage(stage: str, ms: float) -> None:
    _stage_latency().observe(ms, tags={"stage": stage})


def count_embedding_lookup(hit: bool) -> None:
    _embedding_cache().inc(1, tags={"result": "hit" if hit else "miss"})


def count_gateway_embedding(hit: bool) -> None:
    _gateway_embedding().inc(1, tags={"result": "hit" if hit else "miss"})


def set_active_sessions(count: int) -> None:
    _active_sessions().set(count)


def set_jobs(kind: str, running: int, queued: int) -> None:
    _jobs().set(running, tags={"kind": kind, "state": "running"})
    _jobs().set(queued, tags={"kind": kind, "state": "queued"})


def report_gpu_memory(model: str) -> None:
    """After a model call: what torch holds on the GPU (nothing to say on a CPU replica)."""
    import torch

    if torch.cuda.is_available():
        _gpu_memory().set(torch.cuda.memory_allocated(), tags={"model": model})
