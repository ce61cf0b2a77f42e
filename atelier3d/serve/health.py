"""``/healthz`` and ``/readyz``: the Gateway answers for itself and for every model deployment."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter
from ray import serve
from ray.serve.handle import DeploymentHandle

from atelier3d.api.common import ModelInfo, ReadyInfo
from atelier3d.errors import Unavailable
from atelier3d.pull_status import downloading_message


class Health:
    """Readiness of the model deployments behind the Gateway: ``handles`` maps the name
    ``/readyz`` reports (``sam_encoder``, ...) to each deployment's handle; ``without_model``
    deployments (MeshFinish) report no model, but need a running replica all the same;
    ``cache`` is where a pull that ``atelier3d serve`` runs beside the replicas keeps its
    progress."""

    def __init__(self, handles: dict[str, DeploymentHandle],
                 without_model: list[DeploymentHandle] | None = None,
                 cache: Path | None = None) -> None:
        self.handles = handles
        self.without_model = without_model or []
        self.cache = cache

    async def downloading(self) -> str | None:
        """Each model whose weights the server is still pulling, with its percentage (the
        replicas that load them wait); None when no pull runs."""
        if self.cache is None:
            return None
        return await asyncio.to_thread(downloading_message, self.cache)

    async def ready(self) -> ReadyInfo:
        async def info(handle) -> ModelInfo:
            return await asyncio.wait_for(handle.info.remote(), timeout=10)

        def without_replicas() -> list[str]:
            """One line per model deployment with no running replica, from Serve's status. Once
            a replica has waited RAY_SERVE_SLOW_STARTUP_WARNING_S (30 s by default) to be
            scheduled, Serve's message names the resources it asks for and those available."""
            applications = serve.status().applications
            lines = []
            for handle in [*self.handles.values(), *self.without_model]:
                app = applications.get(handle.app_name)
                status = app.deployments.get(handle.deployment_name) if app else None
                if status is None:
                    lines.append(f"{handle.deployment_name} (not deployed)")
                    continue
                states = {getattr(s, "value", s): n for s, n in status.replica_states.items()}
                if states.get("RUNNING"):
                    continue
                replicas = ", ".join(f"{n} {s}" for s, n in states.items()) or "no replicas"
                why = status.message or "waiting for resources, or loading its weights"
                state = getattr(status.status, "value", status.status)
                lines.append(f"{handle.deployment_name} ({state}, {replicas}): {why}")
            return lines

        # A replica Ray cannot place (a GPU fraction no node has left, num_gpus on a node without
        # GPUs) waits forever and silently: name those deployments and what Serve says they wait
        # for, rather than let their info() below time out anonymously.
        waiting = await asyncio.to_thread(without_replicas)
        if waiting:
            downloading = await self.downloading()
            if downloading:  # what those replicas wait for
                raise Unavailable(downloading, retry_after_s=5)
            raise Unavailable("model deployments without a running replica: " + "; ".join(waiting),
                              retry_after_s=5)
        try:
            infos = await asyncio.gather(*(info(handle) for handle in self.handles.values()))
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            raise Unavailable(f"model deployments are not ready: {exc!r}", retry_after_s=5) from exc
        models = dict(zip(self.handles, infos, strict=True))
        untrained = any(m.weights == "untrained" for m in models.values())
        return ReadyInfo(ready=True, weights="untrained" if untrained else "trained", models=models)


def build_health_router(health: Health) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz", response_model=ReadyInfo)
    async def readyz() -> ReadyInfo:
        return await health.ready()

    return router
