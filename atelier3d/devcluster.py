"""A real multi-node Ray cluster on one machine, for tests and benchmarks
(``tests/test_multinode.py``, ``benchmarks/scale.py --two-node``).

Each node is a ``ray start`` (head, then workers joining it) with a temp dir and ports of its
own, started in a process group of its own: ``stop()`` ends exactly those groups (the raylet,
GCS, agents and workers they spawned), never other Ray processes of the machine, which
``ray stop`` would. It then checks that no process of the cluster is left (by the temp dir in
their command lines). Custom resources stand for what a real node would have (a GPU node:
``{"model_node": 1}``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    temp_dir: Path
    pgid: int
    resources: dict
    log: Path


@dataclass
class LocalCluster:
    """``with LocalCluster() as cluster: cluster.start_head(...); cluster.add_node(...)``."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="a3d-rc-",
                                                                     dir="/tmp")))
    nodes: list[Node] = field(default_factory=list)
    address: str | None = None  # the GCS, host:port
    dashboard_url: str | None = None
    env: dict = field(default_factory=dict)
    object_store_bytes: int = 512 * 2**20  # per node: embeddings, images, meshes are small

    def __post_init__(self) -> None:
        # The cluster's processes: not the caller's Ray address, no usage stats, and token
        # authentication off (a cluster of test processes on one machine; `ray.init` and the
        # CLI read the same variable).
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")

    def _ray_start(self, name: str, args: list[str], resources: dict,
                   timeout_s: float) -> Node:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        ports = ["--node-manager-port", str(_free_port()),
                 "--object-manager-port", str(_free_port()),
                 "--dashboard-agent-listen-port", str(_free_port()),
                 "--dashboard-agent-grpc-port", str(_free_port()),
                 "--runtime-env-agent-port", str(_free_port()),
                 "--metrics-export-port", str(_free_port())]
        command = [str(Path(sys.executable).with_name("ray")), "start", *args, *ports,
                   f"--object-store-memory={self.object_store_bytes}",
                   f"--temp-dir={temp_dir}", f"--resources={json.dumps(resources)}",
                   "--disable-usage-stats"]
        with open(log, "w") as out:
            # A session (and process group) of its own: every process this node starts stays in
            # it, so stop() can end them all, and only them.
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
            node = Node(name, temp_dir, proc.pid, resources, log)
            self.nodes.append(node)
            try:
                code = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"`ray start` of {name} took over {timeout_s}s: "
                                   f"{log.read_text()[-3000:]}") from None
        if code != 0:
            raise RuntimeError(f"`ray start` of {name} failed ({code}): {log.read_text()[-3000:]}")
        return node

    def start_head(self, num_cpus: float = 2, resources: dict | None = None,
                   dashboard: bool = True, timeout_s: float = 90) -> str:
        port = _free_port()
        args = ["--head", f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                "--node-ip-address=127.0.0.1",
                f"--ray-client-server-port={_free_port()}",
                f"--include-dashboard={'true' if dashboard else 'false'}"]
        if dashboard:
            dash = _free_port()
            args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
            self.dashboard_url = f"http://127.0.0.1:{dash}"
        self._ray_start("head", args, resources or {}, timeout_s)
        self.address = f"127.0.0.1:{port}"
        return self.address

    def add_node(self, name: str, num_cpus: float = 2, resources: dict | None = None,
                 timeout_s: float = 90) -> Node:
        if self.address is None:
            raise RuntimeError("start the head first")
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                "--node-ip-address=127.0.0.1"]
        return self._ray_start(name, args, resources or {}, timeout_s)

    # ---- teardown -----------------------------------------------------------------------------

    def leftovers(self) -> list[int]:
        """Pids of processes still running with this cluster's temp dir in their command line
        (raylet, GCS, agents and workers all carry it)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                if str(self.root).encode() in cmdline:
                    found.append(int(entry.name))
        return [p for p in found if p != os.getpid()]

    def _signal_groups(self, sig: int) -> None:
        for node in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.pgid, sig)

    def stop(self, grace_s: float = 5.0) -> list[int]:
        """Ends every process of the cluster (SIGTERM, then SIGKILL after ``grace_s``);
        returns the pids that survived even that (empty when all went)."""
        self._signal_groups(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        self._signal_groups(signal.SIGKILL)
        # Processes of the cluster that left its groups (none known): by pid, as a last resort.
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        left = self.leftovers()
        if not left:
            shutil.rmtree(self.root, ignore_errors=True)
        return left

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for node in self.nodes:
            with contextlib.suppress(OSError):
                parts.append(f"--- {node.name} ---\n{node.log.read_text()[-tail:]}")
        return "\n".join(parts)
