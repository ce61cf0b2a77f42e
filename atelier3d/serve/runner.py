"""Starting and stopping the system on an embedded local Ray (``atelier3d serve``, the tests)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import yaml

from atelier3d.config import AppConfig

logger = logging.getLogger(__name__)

APP_NAME = "atelier3d"


def packaged_config_path(name: str) -> Path:
    """A config shipped in the package (atelier3d/serve/configs), e.g. ``gpu-80g.yaml``."""
    return Path(str(resources.files("atelier3d.serve") / "configs" / name))


def default_config_path() -> Path:
    return packaged_config_path("local.yaml")


def load_serve_config(
    path: str | Path | None = None,
    models: str | None = None,
    port: int | None = None,
    args_override: dict | None = None,
) -> dict:
    """Reads a Serve YAML and applies the CLI's overrides to it (a plain dict, ready to deploy)."""
    with open(path or default_config_path()) as f:
        config = yaml.safe_load(f)
    if port is not None:
        config.setdefault("http_options", {})["port"] = port
    for app in config["applications"]:
        args = app.setdefault("args", {})
        if models is not None:
            args["models"] = models
        for key, value in (args_override or {}).items():
            if isinstance(value, dict) and isinstance(args.get(key), dict):
                args[key] = {**args[key], **value}
            else:
                args[key] = value
        if args.get("cache_dir"):
            # Replicas run in other working directories: a relative cache dir means this one's.
            args["cache_dir"] = str(Path(args["cache_dir"]).expanduser().resolve())
    return config


def load_from_cache_only(config: dict) -> None:
    """The replicas of applications with ``models: real`` load their weights from the local
    cache only (``HF_HUB_OFFLINE=1`` in their environment): ``serve`` has pulled them."""
    for app in config["applications"]:
        if (app.get("args") or {}).get("models") == "real":
            env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
            env.setdefault("HF_HUB_OFFLINE", "1")


# Which model deployments run each kind of job (the Gateway's job queues, ``jobs.<kind>``); all
# of a kind's running jobs may be in any one of them at once (a split mesh job is on Shape3D,
# then on MeshFinish).
JOB_DEPLOYMENTS = {"edit": ("ImageEditor",), "mesh": ("Shape3D", "MeshFinish")}
SERVE_MAX_ONGOING_REQUESTS = 5  # Ray Serve's default, where a config leaves it out


def reachable_replicas(deployment: dict) -> int:
    """Replicas a deployment can reach: ``num_replicas``, or autoscaling's ``max_replicas``."""
    autoscaling = deployment.get("autoscaling_config")
    if autoscaling:
        return int(autoscaling.get("max_replicas", 1))
    return int(deployment.get("num_replicas", 1))


def check_job_capacity(config: dict) -> None:
    """Raises ``ValueError`` where the Gateways would dispatch more jobs of a kind at once
    (``jobs.<kind>.max_running`` x Gateway replicas) than its model deployment can take
    (replicas x ``max_ongoing_requests``): the extra jobs would sit in Serve's router, unseen by
    the job queue's positions and ETAs, or be turned away by its ``max_queued_requests``."""
    for app in config["applications"]:
        deployments = {d["name"]: d for d in app.get("deployments", [])}
        jobs = AppConfig.model_validate(app.get("args", {})).jobs
        gateways = reachable_replicas(deployments.get("Gateway", {}))
        for kind, name in ((kind, name) for kind, names in JOB_DEPLOYMENTS.items()
                           for name in names):
            model = deployments.get(name, {})
            replicas = reachable_replicas(model)
            ongoing = int(model.get("max_ongoing_requests", SERVE_MAX_ONGOING_REQUESTS))
            max_running = getattr(jobs, kind).max_running
            if max_running * gateways > replicas * ongoing:
                raise ValueError(
                    f"jobs.{kind}.max_running {max_running} x {gateways} Gateway replica(s) "
                    f"dispatch {max_running * gateways} jobs at once, but {name} takes at most "
                    f"{replicas * ongoing} ({replicas} replica(s) x max_ongoing_requests "
                    f"{ongoing}): lower max_running or give {name} more replicas")


def init_ray(num_cpus: float | None = None, num_gpus: float | None = None,
             metrics_port: int | None = None) -> None:
    """``metrics_port``: where Ray's metrics agent serves Prometheus text (Ray's ``ray_serve_*``
    and our ``ray_atelier_*``); default ``$ATELIER3D_METRICS_PORT``, else Ray picks one."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh embedded cluster, never one found on the machine.
        # Logical CPUs: replicas ask for fractions of them; the OS shares the real cores.
        ray.init(
            address="local",
            num_cpus=num_cpus or max(4, os.cpu_count() or 1),
            num_gpus=num_gpus,
            include_dashboard=False,
            log_to_driver=os.environ.get("ATELIER3D_RAY_LOGS", "1") == "1",
            _metrics_export_port=metrics_port or int(os.environ.get("ATELIER3D_METRICS_PORT", 0))
            or None,
        )


def deploy(config: dict, timeout_s: float = 600.0, stop: threading.Event | None = None,
           busy: Callable[[], bool] | None = None) -> None:
    """Deploys every application of the Serve config ``config`` and waits until they run, or
    until ``stop`` is set (a SIGTERM while replicas load weights). While ``busy()`` (a pull
    the replicas wait for) the ``timeout_s`` does not run: it counts from its end."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    check_job_capacity(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)
    deadline = time.monotonic() + timeout_s
    pause = stop if stop is not None else threading.Event()
    names = [app.name for app in schema.applications]
    while True:
        statuses = serve.status().applications
        states = {name: statuses[name].status if name in statuses else "NOT_STARTED"
                  for name in names}
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            raise RuntimeError(f"{failed[0]} failed: {statuses[failed[0]].message}")
        if busy is not None and busy():
            deadline = time.monotonic() + timeout_s
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout_s}s: {states}")
        if pause.wait(0.5):
            return  # stopped before the applications ran


def start(config: dict, num_cpus: float | None = None, num_gpus: float | None = None,
          timeout_s: float = 600.0, metrics_port: int | None = None) -> None:
    """Starts a local Ray, then deploys ``config`` on it."""
    init_ray(num_cpus, num_gpus, metrics_port)
    deploy(config, timeout_s)


# A stop lets Serve drain in-flight requests for this long, then ends the local cluster. Serve's
# own shutdown deletes the Gateway, then the models, each after its replicas' drain (a 2 s wait
# loop, up to graceful_shutdown_timeout_s, 20 s, for a running edit or mesh: 23 s measured); the
# models' work is lost either way once the Gateway that asked for it is gone.
STOP_DRAIN_S = 3.0


def stop(drain_s: float = STOP_DRAIN_S) -> None:
    """Stops Serve (at most ``drain_s`` for in-flight requests), then the local Ray, and waits
    until Ray's processes (GCS, raylet, and with it the replicas' workers) have exited."""
    import ray

    if not ray.is_initialized():
        return
    started = time.monotonic()
    try:
        asyncio.run(_drain_serve(drain_s))
    finally:
        drained = time.monotonic()
        ray.shutdown(wait_for_processes=True)
        logger.info("stopped: Serve in %.1f s, Ray in %.1f s", drained - started,
                    time.monotonic() - drained)


async def _drain_serve(drain_s: float) -> None:
    from ray import serve

    try:
        await asyncio.wait_for(serve.shutdown_async(), drain_s)
    except asyncio.TimeoutError:
        logger.info("Serve did not finish shutting down within %.0f s: ending Ray, and any "
                    "request still in flight", drain_s)
