"""Dependencies point one way (STYLE.md section 2), checked on every module's imports, parsed with ast.

mixtral <- experts, router <- cluster; protos is used by experts, router and cluster.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mixtral", "experts", "router", "cluster", "protos")
STDLIB = frozenset(sys.stdlib_module_names)
MIXTRAL_ALLOWED = frozenset({"torch", "safetensors", "mixtral"})
# Modules that may start or talk to Ray: the actor shell and the deployment code.
RAY_ALLOWED_IN = ("experts/actor.py", "cluster/")


def imported_modules(source: str, module: str) -> set[str]:
    """Top-level names of every module `source` imports (in functions too); `module` is its dotted name.

    Relative imports are resolved: `from .checkpoint import X` in mixtral.model imports mixtral.
    Constant-string `importlib.import_module(...)` and `__import__(...)` calls count as imports.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[:-node.level]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return {name.split(".")[0] for name in found if name}


def product_modules() -> dict[str, set[str]]:
    """'package/module.py' -> top-level names it imports, for every .py file of the packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO)
            dotted = ".".join(rel.with_suffix("").parts)
            modules[rel.as_posix()] = imported_modules(path.read_text(), dotted)
    return modules


MODULES = product_modules()


def layering_violations(modules: dict[str, set[str]]) -> list[str]:
    """Every import that breaks STYLE.md section 2, one readable line each; empty when the layering holds."""
    found = []
    for module, names in sorted(modules.items()):
        package = module.split("/")[0]
        nothing: set[str] = set()
        rules = [
            ("mixtral uses only the standard library, torch and safetensors",
             names - STDLIB - MIXTRAL_ALLOWED if package == "mixtral" else nothing),
            ("experts never imports router", names & {"router"} if package == "experts" else nothing),
            ("router never imports experts", names & {"experts"} if package == "router" else nothing),
            ("only cluster imports cluster", names & {"cluster"} if package != "cluster" else nothing),
            ("protos imports no service package",
             names & {"experts", "router", "cluster"} if package == "protos" else nothing),
            ("no Kubernetes client in the model or the services",
             names & {"kubernetes"} if package in ("mixtral", "experts", "router") else nothing),
            ("ray only in experts/actor.py and cluster/",
             names & {"ray"} if not module.startswith(RAY_ALLOWED_IN) else nothing),
            ("transformers is the test oracle only, never a dependency", names & {"transformers"}),
        ]
        found += [f"{module} imports {sorted(bad)}: {rule}" for rule, bad in rules if bad]
    return found


def test_every_package_is_scanned() -> None:
    for package in ("mixtral", "experts", "router", "cluster"):
        assert any(m.startswith(f"{package}/") and m != f"{package}/__init__.py" for m in MODULES), package
    assert "mixtral" in MODULES["experts/weights.py"]  # imports are really found
    assert {"torch", "safetensors", "mixtral"} <= MODULES["mixtral/checkpoint.py"]


def test_product_code_follows_the_dependency_rules() -> None:
    assert layering_violations(MODULES) == []


@pytest.mark.parametrize(("module", "source", "rule"), [
    ("mixtral/gate.py", "import numpy", "standard library, torch and safetensors"),
    ("mixtral/gate.py", "def f():\n    import grpc", "standard library, torch and safetensors"),
    ("mixtral/gate.py", "from protos import tensors_pb2", "standard library, torch and safetensors"),
    ("experts/service.py", "from router.engine import Engine", "experts never imports router"),
    ("router/engine.py", "from experts import weights", "router never imports experts"),
    ("router/engine.py", "import importlib\nimportlib.import_module('experts.backend')",
     "router never imports experts"),
    ("experts/weights.py", "from cluster.deploy import LocalConfig", "only cluster imports cluster"),
    ("protos/tensors.py", "import router.engine", "protos imports no service package"),
    ("router/dispatch.py", "import ray", "ray only in experts/actor.py and cluster/"),
    ("experts/service.py", "from kubernetes import client", "no Kubernetes client"),
    ("router/engine.py", "from transformers import AutoModel", "test oracle only"),
    ("cluster/deploy.py", "import transformers", "test oracle only"),
])
def test_a_forbidden_import_is_reported(module: str, source: str, rule: str) -> None:
    dotted = module.removesuffix(".py").replace("/", ".")

    found = layering_violations({module: imported_modules(source, dotted)})

    assert any(rule in line and module in line for line in found), found


@pytest.mark.parametrize(("module", "source"), [
    ("mixtral/model.py", "from .checkpoint import Checkpoint\nimport json\nimport torch.nn.functional"),
    ("experts/service.py", "import grpc\nfrom protos import expert_pb2\nfrom mixtral.expert import expert_ffn"),
    ("experts/actor.py", "import ray"),
    ("router/dispatch.py", "import grpc\nfrom protos import expert_pb2_grpc"),
    ("cluster/deploy.py", "import ray\nimport kubernetes\nfrom experts.service import build_server\n"
                          "from router.api import build_server as build_router"),
])
def test_an_allowed_import_is_not_reported(module: str, source: str) -> None:
    dotted = module.removesuffix(".py").replace("/", ".")

    assert layering_violations({module: imported_modules(source, dotted)}) == []


def test_relative_imports_resolve_to_their_package() -> None:
    assert imported_modules("from . import gate\nfrom .rope import apply_rope", "mixtral.block") == {"mixtral"}
    assert imported_modules("from ..router import engine", "experts.sub.mod") == {"experts"}
