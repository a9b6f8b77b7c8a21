"""One real two-node Ray cluster per test session (`ray start` head + a node on 127.0.0.2), each
node declaring 2 GPUs (no GPU is present: Ray still assigns GPU ids, torch stays on the CPU)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from tests.raynodes import RayNodes

NAMESPACE = "moe-test"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayNodes]:
    nodes = RayNodes(Path(tempfile.mkdtemp(prefix="r", dir="/tmp")))
    try:
        nodes.start_head(num_cpus=8, num_gpus=2)
        nodes.add_node("n2", "127.0.0.2", num_cpus=8, num_gpus=2)
        ray.init(address=nodes.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, "the second Ray node did not join within 60 s"
            time.sleep(0.2)
        yield nodes
    finally:
        ray.shutdown()
        nodes.stop_all()
