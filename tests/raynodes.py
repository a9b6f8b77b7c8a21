"""Real Ray nodes on this machine, for tests about nodes: `ray start --block` processes we own.

The head binds the machine's address; each further node declares its own loopback address
(127.0.0.2, 127.0.0.3, ...), so Ray sees distinct nodes. Every node runs in its own temp dir and is
stopped through the pid of its `ray start --block` process (SIGTERM ends that node's processes
cleanly), never with `ray stop`, which would kill every Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RayNodes:
    """A head node plus worker nodes, each a `ray start --block` child process."""

    root: Path
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    address: str = ""

    def start_head(self, num_cpus: int, num_gpus: int) -> str:
        self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false"], num_cpus, num_gpus)
        self.address = self._wait_for_address()
        return self.address

    def add_node(self, name: str, ip: str, num_cpus: int, num_gpus: int) -> None:
        self._start(name, [f"--address={self.address}", f"--node-ip-address={ip}"], num_cpus, num_gpus)

    def _start(self, name: str, args: list[str], num_cpus: int, num_gpus: int) -> None:
        temp = self.root / name  # short: Unix socket paths are limited to 107 bytes
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the child process owns it
        self.processes[name] = subprocess.Popen(
            [RAY, "start", "--block", *args, f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
             f"--temp-dir={temp}", "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # the node's processes share a process group we can end together

    def _wait_for_address(self, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        log = self.root / "head.log"
        while time.monotonic() < deadline:
            for line in log.read_text(errors="replace").splitlines():
                if "ray start --address=" in line:
                    return line.split("--address=")[1].strip().strip("'")
            if self.processes["head"].poll() is not None:
                raise RuntimeError(f"ray head exited: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"ray head did not start within {timeout_s} s")

    def stop(self, name: str, grace_s: float = 5.0) -> None:
        """SIGTERM the node, then SIGKILL whatever of its process group is left after `grace_s`."""
        proc = self.processes.pop(name)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
        self._kill_group(proc)

    def crash(self, name: str) -> None:
        """Kill every process of a node at once, as a machine failure would."""
        self._kill_group(self.processes.pop(name))

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the node's session: its process group, and the workers Ray put in groups of their own."""
        members = [p for p in psutil.process_iter() if _session_of(p) == proc.pid]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for member in members:
            with contextlib.suppress(psutil.Error):
                member.kill()
        proc.wait()


    def stop_all(self) -> None:
        for name in [n for n in self.processes if n != "head"] + ["head"]:
            if name in self.processes:
                self.stop(name)


def _session_of(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None
