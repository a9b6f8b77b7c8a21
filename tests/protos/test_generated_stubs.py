"""The committed stubs are exactly what `python -m protos.generate` makes, and its --check notices drift."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from protos import generate

REPO = Path(__file__).resolve().parents[2]


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "protos.generate", "--check", "--root", str(root)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_the_committed_stubs_are_up_to_date() -> None:
    done = run_check(REPO)

    assert done.returncode == 0, done.stderr


def test_every_service_proto_is_generated_and_committed() -> None:
    assert set(generate.stub_names(REPO)) >= {
        f"protos/{name}{suffix}" for name in ("admin", "expert", "kserve", "router") for suffix in generate.SUFFIXES}
    assert all((REPO / name).is_file() for name in generate.stub_names(REPO))


def test_generation_writes_the_three_stubs_of_every_proto_importing_from_protos(tmp_path: Path) -> None:
    copy = copy_protos(tmp_path)
    for stub in (copy / "protos").glob("*_pb2*"):
        stub.unlink()

    assert generate.main(["--root", str(copy)]) == 0

    assert sorted(p.name for p in (copy / "protos").glob("expert_pb2*")) == [
        "expert_pb2.py", "expert_pb2.pyi", "expert_pb2_grpc.py"]
    assert "from protos import expert_pb2" in (copy / "protos" / "expert_pb2_grpc.py").read_text()


def edit_grpc_stub(protos: Path) -> None:
    stub = protos / "expert_pb2_grpc.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")


def delete_pyi(protos: Path) -> None:
    (protos / "expert_pb2.pyi").unlink()


def add_orphan(protos: Path) -> None:
    (protos / "gone_pb2.py").write_text("# a stub whose .proto was deleted\n")


@pytest.mark.parametrize(("change", "stale"), [
    (edit_grpc_stub, "protos/expert_pb2_grpc.py"),
    (delete_pyi, "protos/expert_pb2.pyi"),
    (add_orphan, "protos/gone_pb2.py"),
])
def test_check_names_a_stale_stub_and_fails(tmp_path: Path, change: Callable[[Path], None], stale: str) -> None:
    copy = copy_protos(tmp_path)
    change(copy / "protos")

    done = run_check(copy)

    assert done.returncode == 1
    assert [line.split()[0] for line in done.stderr.splitlines()] == [stale]


def copy_protos(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "protos", copy / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    return copy
