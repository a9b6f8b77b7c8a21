"""The image recipe (helm/image/Dockerfile), read as text: no Docker engine runs here to build it."""

from __future__ import annotations

import re

from tests.helm import tools

DOCKERFILE = (tools.REPO / "helm" / "image" / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    return re.findall(rf"^{name}\s+(.+)$", DOCKERFILE, flags=re.MULTILINE)


def test_runs_as_a_numeric_non_root_user_when_built() -> None:
    assert instructions("USER") == ["10001:10001"]
    assert "useradd --uid 10001" in DOCKERFILE


def test_installs_the_project_with_its_constraints_when_built() -> None:
    assert "pip install -c constraints.txt ." in DOCKERFILE
    assert "grep -E '^torch==' constraints.txt" in DOCKERFILE
    # Every package the image installs is one of the project's: its source folders are all copied.
    for package in ("mixtral", "experts", "router", "cluster", "protos"):
        assert f"COPY {package} ./{package}" in DOCKERFILE
    # setup.py builds the CPU kernels, with the compiler the builder stage installs
    assert "COPY pyproject.toml setup.py" in DOCKERFILE and "install -y --no-install-recommends g++" in DOCKERFILE


def test_selects_cpu_or_cuda_base_and_torch_index_when_variant_is_given() -> None:
    assert "ARG VARIANT=cpu" in DOCKERFILE
    assert re.search(r"^FROM \$\{CPU_BASE\} AS base-cpu$", DOCKERFILE, flags=re.MULTILINE)
    assert re.search(r"^FROM \$\{CUDA_BASE\} AS base-cuda$", DOCKERFILE, flags=re.MULTILINE)
    assert "whl/cpu" in DOCKERFILE and "whl/cu128" in DOCKERFILE
    # Builder and runtime share the variant's base, so the venv's interpreter exists at run time.
    assert instructions("FROM").count("base-${VARIANT} AS builder") == 1
    assert instructions("FROM").count("base-${VARIANT} AS runtime") == 1


def test_keeps_writable_paths_under_tmp_when_the_root_filesystem_is_read_only() -> None:
    for setting in ("HOME=/tmp", "TMPDIR=/tmp", "XDG_CACHE_HOME=/tmp/.cache", "PYTHONDONTWRITEBYTECODE=1"):
        assert setting in DOCKERFILE


def test_starts_moe_cluster_when_run() -> None:
    assert instructions("ENTRYPOINT") == ['["moe-cluster"]']
