"""The Ray actor that hosts experts: a thin shell that loads its shard and runs the ExpertService.

Ray places and supervises it (restarts it after a crash, on a new port); the token path never goes
through Ray: routers call the gRPC endpoint this actor reports. Lifecycle methods only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import psutil
import ray
import torch

from experts.service import ExpertServerConfig, ExpertServiceServicer, ServingThread
from experts.weights import load_shard, reload_shard
from mixtral.allocator import keep_freed_memory
from mixtral.checkpoint import Checkpoint
from mixtral.config import DTYPES, ModelConfig
from protos.security import DispatchTls

log = logging.getLogger(__name__)

class ExpertHost:
    """Loads the (layer, expert) entries of one plan host and serves them over gRPC."""

    def __init__(self, host_id: str, model_dir: str, entries: list[list[int]], dtype: str,
                 max_message_bytes: int, tls_files: list[str] | None = None) -> None:
        self.host_id = host_id
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.device = torch.device("cuda:0" if self.gpu_ids and torch.cuda.is_available() else "cpu")
        # The shard loads on this thread with one torch thread; Dispatch computes on the servicer's worker
        # with the CPUs Ray assigned (one OpenMP team per process: see ExpertServiceServicer).
        threads = _assigned_cpus()
        torch.set_num_threads(1)
        self.dtype = DTYPES[dtype]  # resolved by the router's config, so hosts and router agree
        config = ModelConfig.from_json(Path(model_dir) / "config.json")
        self.checkpoint = Checkpoint(Path(model_dir), config)
        shard = load_shard(self.checkpoint, _entries(entries), self.dtype, self.device)
        keep_freed_memory()  # after the load, so that its temporaries went back to the system
        self.servicer = servicer = ExpertServiceServicer(shard, config, host_id, self.dtype, self.device,
                                                                threads)
        self.address = ray.util.get_node_ip_address()
        # TLS files are paths on this node (a mounted Secret): keys never travel through Ray.
        tls = DispatchTls.from_files(Path(tls_files[0]), Path(tls_files[1]), Path(tls_files[2])) if tls_files else None
        self.server = ServingThread.start(servicer, ExpertServerConfig(max_message_bytes=max_message_bytes, tls=tls),
                                          address=self.address)
        log.info("%s serves %d experts on %s:%d (%s)", host_id, len(entries), self.address, self.server.port,
                 self.device)

    def endpoint(self) -> str:
        """host:port of this actor's ExpertService (changes when Ray restarts the actor)."""
        return f"{self.address}:{self.server.port}"

    def entries(self) -> list[list[int]]:
        """The (layer, expert) entries served now."""
        return [[layer, expert] for layer, expert in sorted(self.servicer.shard.experts)]

    def apply(self, entries: list[list[int]]) -> int:
        """Serve exactly `entries` from now on (a live re-placement step); returns the expert bytes held.

        Layers whose experts change are re-read from the checkpoint into new stacks while the old ones
        keep serving; calls already running finish on the old stacks.
        """
        shard = reload_shard(self.checkpoint, self.servicer.shard, _entries(entries), self.dtype, self.device)
        self.servicer.replace_shard(shard)
        log.info("%s now serves %d experts (%.1f MiB)", self.host_id, len(shard.experts), shard.num_bytes / 2**20)
        return shard.num_bytes

    def info(self) -> dict[str, Any]:
        """Where the host runs and what it holds: plain JSON-able data."""
        context = ray.get_runtime_context()
        return {
            "host_id": self.host_id, "endpoint": self.endpoint(), "node_id": context.get_node_id(),
            "node_ip": self.address, "gpu_ids": self.gpu_ids, "device": str(self.device), "pid": os.getpid(),
            "expert_bytes": self.servicer.shard.num_bytes, "rss_bytes": psutil.Process().memory_info().rss,
        }

    def stop(self, grace_s: float) -> None:
        """Stop serving after `grace_s` seconds for calls in flight."""
        self.server.stop(grace_s)


def _entries(entries: list[list[int]]) -> list[tuple[int, int]]:
    return [(int(layer), int(expert)) for layer, expert in entries]


def _assigned_cpus() -> int:
    """Torch threads = the CPUs Ray gave this actor (at least one)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))
