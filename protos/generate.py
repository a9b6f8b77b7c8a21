"""Regenerate the committed protobuf/gRPC stubs from every protos/*.proto: the one way to make them.

    python -m protos.generate            # rewrite protos/<name>_pb2.py, _pb2_grpc.py and _pb2.pyi
    python -m protos.generate --check    # regenerate into a temp dir; exit 1 naming each stale file

The include root is the repository root, so a proto is compiled as `protos/<name>.proto` and the
generated code imports `from protos import <name>_pb2`. The output depends only on the .proto files
and the pinned grpcio-tools version (which is written into the stubs), so regenerating is a no-op
on an unchanged tree.
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

log = logging.getLogger(__name__)

PACKAGE = "protos"
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
REPO_ROOT = Path(__file__).resolve().parents[1]


def proto_files(root: Path) -> list[Path]:
    """Every .proto of the package under `root`, sorted so the compiler sees them in a fixed order."""
    return sorted((root / PACKAGE).glob("*.proto"))


def stub_names(root: Path) -> list[str]:
    """protos/<name><suffix> for every proto and suffix: the files `generate` writes."""
    return [f"{PACKAGE}/{proto.stem}{suffix}" for proto in proto_files(root) for suffix in SUFFIXES]


def generate(root: Path, out: Path) -> None:
    """Compile root/protos/*.proto into out/protos/ (include root: `root`)."""
    protos = proto_files(root)
    if not protos:
        raise FileNotFoundError(f"no .proto files in {root / PACKAGE}")
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto, should a proto import them
    args = ["grpc_tools.protoc", f"-I{root}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *(str(p) for p in protos)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[p.name for p in protos]} (its errors are above)")


def stale_stubs(root: Path) -> list[str]:
    """Committed stubs under `root` that differ from a fresh generation, are missing, or have no .proto."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(root, fresh)
        expected = stub_names(root)
        differ = [name for name in expected if not _same_file(root / name, fresh / name)]
    committed = {p.relative_to(root).as_posix() for s in SUFFIXES for p in (root / PACKAGE).glob(f"*{s}")}
    return differ + sorted(committed - set(expected))


def _same_file(committed: Path, fresh: Path) -> bool:
    return committed.is_file() and filecmp.cmp(committed, fresh, shallow=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate",
                                     description="Regenerate protos/*_pb2*.py[i] from protos/*.proto.")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a committed stub is stale")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root holding protos/")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not args.check:
        generate(root, root)
        log.info("wrote %s", " ".join(stub_names(root)))
        return 0
    stale = stale_stubs(root)
    for name in stale:
        log.error("%s is stale: run `python -m protos.generate` and commit the result", name)
    return 1 if stale else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
