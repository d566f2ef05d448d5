"""A real multi-node Ray cluster on this machine, made of ``ray start`` processes.

Each node is one ``ray start --block`` in its own process session, so a node (its raylet,
object store and workers) is killed or stopped by its process group, never by name:
``ray stop`` would also stop every other Ray instance of the user on this machine.

The cluster uses token authentication with a fresh token of its own, so it neither needs
nor touches ``~/.ray/auth_token``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# Fast node-death detection (default ~30 s) so a killed node's trials are retried soon.
HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
          "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LocalCluster:
    """Head plus worker nodes as ``ray start`` process groups; use as a context manager.

    Attributes:
        address: the head's GCS address (``host:port``) once started.
        env: environment for anything that joins the cluster (drivers, nodes): auth token.
    """

    def __init__(self) -> None:
        # AF_UNIX socket paths live under the temp dir and must stay under 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="pswc", dir="/tmp"))
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0", **HEALTH}
        self.address = ""
        self.nodes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start_head(self, num_cpus: int, resources: dict | None = None, timeout_s: float = 90,
                   env: dict | None = None) -> str:
        port = free_port()
        self._start("head", ["--head", f"--port={port}", "--include-dashboard=false"], num_cpus, resources, timeout_s,
                    env)
        self.address = (self.root / "head" / "ray_current_cluster").read_text().strip()
        return self.address

    def add_node(self, name: str, num_cpus: int, resources: dict | None = None, timeout_s: float = 90,
                 env: dict | None = None) -> None:
        """Another node; ``env`` adds to its processes' environment (a node of its own: its own cache root)."""
        self._start(name, [f"--address={self.address}"], num_cpus, resources, timeout_s, env)

    def _start(self, name: str, args: list[str], num_cpus: int, resources: dict | None, timeout_s: float,
               env: dict | None = None) -> None:
        temp = self.root / name
        temp.mkdir()
        log = open(self.root / f"{name}.log", "w")
        cmd = [RAY, "start", *args, f"--num-cpus={num_cpus}", f"--temp-dir={temp}", "--disable-usage-stats", "--block"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        self.nodes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                            start_new_session=True)
        log.close()
        self._wait_started(name, timeout_s)

    def _wait_started(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log(name):
                return
            if self.nodes[name].poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"ray node {name} did not start:\n{self.log(name)[-3000:]}")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's whole process group: raylet, object store and its workers at once."""
        proc = self.nodes.pop(name)
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop every node this cluster started (workers first), then remove its temp dir."""
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            proc = self.nodes.pop(name)
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            # `ray start --block` may linger after its children exit; SIGKILL whatever is left.
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
