"""`moe-cluster demo-model`, and the demo checkpoints `serve --demo` builds once and reuses."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from cluster.arguments import positive_int
from cluster.demo import SIZES, write_demo_model


def add_demo_model_command(commands: argparse._SubParsersAction[Any]) -> None:
    p = commands.add_parser("demo-model", help="write a random-weight Mixtral checkpoint (HF layout)")
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="tiny: loads in a second; mini: the benchmark model (791M parameters)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--shard-size", type=positive_int, default=None, metavar="BYTES",
                   help="split into safetensors shards of at most BYTES, with an index")
    p.set_defaults(run=run_demo_model)


def run_demo_model(args: argparse.Namespace) -> int:
    build_demo(args.out, args.size, args.seed, args.shard_size)
    return 0


def build_demo(out: Path, size: str, seed: int, shard_size: int | None) -> None:
    """Write a demo checkpoint, showing progress on stderr."""
    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            print(f"\rbuilding {size} demo model: {100 * done // total:3d}%", end="", file=sys.stderr)

    start = time.perf_counter()
    config = write_demo_model(out, size, seed, shard_size, progress)
    print(f"\nwrote {out} ({config.num_hidden_layers} layers, {config.num_local_experts} experts, "
          f"hidden {config.hidden_size}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def demo_dir(size: str, cache: Path) -> Path:
    """The demo checkpoint of `size`, built once into `cache` and reused."""
    out = cache / f"mixtral-{size}"
    if (out / ".complete").is_file():
        return out
    print(f"building the {size} demo checkpoint into {out} (once)", file=sys.stderr)
    build_demo(out, size, seed=0, shard_size=None)
    (out / ".complete").write_text("ok\n")
    return out
