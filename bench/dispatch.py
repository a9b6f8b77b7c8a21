"""Dispatch benchmark: in-process experts vs expert hosts on Ray over gRPC, in one run.

    .venv/bin/python bench/dispatch.py --model models/mini [--dtype float32] [--batch 1 8 32]
        [--hosts 2] [--out bench/results/dispatch]

For each backend (in-process; cluster with N hosts; cluster with micro-batch overlap) and each
batch size B it measures, on the same prompts:
  - per-layer expert time: one layer's expert call on B decode rows, median over layers and
    repeats; the cluster's overhead is its time minus the in-process time;
  - decode tokens/s: B sequences with 128-token prompts, median decode step after a warm-up.
Writes a markdown table (stdout and OUT.md), the raw numbers (OUT.json) and a plot (OUT.png).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cluster.deploy import ClusterConfig, LocalConfig, build_engine, load_cluster_model, load_local_model
from cluster.placement import HostResources
from mixtral.gate import route
from mixtral.model import Mixtral
from router.engine import EngineConfig
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams


@dataclass
class Row:
    backend: str
    batch: int
    layer_expert_us: float  # median time of one layer's expert call on B rows
    decode_step_ms: float
    decode_tok_s: float


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def layer_expert_time(model: Mixtral, batch: int, repeats: int) -> float:
    """Median seconds of one layer's expert call on `batch` rows routed by the real gate."""
    cfg = model.config
    generator = torch.Generator().manual_seed(batch)
    hidden = torch.randn(batch, cfg.hidden_size, generator=generator).to(model.dtype)
    times = []
    for _ in range(repeats):
        for layer in model.layers:
            assert layer.weights.gate is not None
            weights, ids = route(layer.weights.gate(hidden), cfg.num_experts_per_tok)
            start = time.perf_counter()
            layer.experts(layer.index, hidden, ids, weights)
            times.append(time.perf_counter() - start)
    return statistics.median(times[len(model.layers):])  # the first round warms channels and caches


def decode_step_time(model: Mixtral, batch: int, prompt_len: int, steps: int, overlap: bool) -> float:
    generator = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, model.config.vocab_size, (prompt_len - 1,), generator=generator).tolist()]
               for _ in range(batch)]
    engine = build_engine(model, CacheConfig(num_slots=batch, max_seq_len=prompt_len + steps + 4),
                          EngineConfig(max_batch_tokens=batch * prompt_len, overlap_microbatches=overlap))
    params = SamplingParams(max_new_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add(str(i), prompt, params)
    engine.step()  # prefill
    times = []
    while engine.running:
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def measure(name: str, model: Mixtral, args: argparse.Namespace, overlap: bool) -> list[Row]:
    rows = []
    for batch in args.batch:
        log(f"{name}: batch {batch}")
        expert_s = layer_expert_time(model, batch, args.repeats)
        step_s = decode_step_time(model, batch, args.prompt_len, args.steps, overlap)
        rows.append(Row(name, batch, expert_s * 1e6, step_s * 1e3, batch / step_s))
    return rows


def measure_cluster(args: argparse.Namespace) -> list[Row]:
    log(f"starting {args.hosts} expert hosts on a local Ray instance")
    cfg = ClusterConfig(args.model, num_hosts=args.hosts, dtype=args.dtype, device="cpu",
                        hosts=HostResources(num_cpus=1), name="bench-controller")
    model, cluster = load_cluster_model(cfg)
    with cluster:
        return (measure(f"cluster {args.hosts} hosts", model, args, False)
                + measure(f"cluster {args.hosts} hosts + overlap", model, args, True))


def table(rows: list[Row]) -> str:
    local = {r.batch: r for r in rows if r.backend == "in-process"}
    lines = ["| backend | B | layer experts (us) | dispatch overhead per layer (us) | decode step (ms) "
             "| decode tok/s |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        overhead = r.layer_expert_us - local[r.batch].layer_expert_us if r.batch in local else float("nan")
        lines.append(f"| {r.backend} | {r.batch} | {r.layer_expert_us:.0f} | {overhead:+.0f} | "
                     f"{r.decode_step_ms:.1f} | {r.decode_tok_s:.1f} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r.backend for r in rows))
    batches = sorted({r.batch for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        mine = {r.batch: r for r in rows if r.backend == backend}
        xs = [b + (i - (len(backends) - 1) / 2) * width for b in range(len(batches))]
        axes[0].bar(xs, [mine[b].decode_tok_s for b in batches], width, label=backend)
        axes[1].bar(xs, [mine[b].layer_expert_us / 1e3 for b in batches], width, label=backend)
    for ax, ylabel in zip(axes, ["decode tokens/s (higher is better)", "one layer's experts, ms (lower is better)"],
                          strict=True):
        ax.set_xticks(range(len(batches)), [f"B={b}" for b in batches])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="decode steps timed per batch size")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over the layers for the expert timing")
    parser.add_argument("--threads", type=int, default=None, help="router torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/dispatch"))
    parser.add_argument("--part", choices=["all", "cluster"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    if args.part == "cluster":
        rows = measure_cluster(args)
        args.out.with_suffix(".cluster.json").write_text(json.dumps([asdict(r) for r in rows]))
        return
    log(f"loading {args.model} in-process ({args.dtype}, {torch.get_num_threads()} threads)")
    local = load_local_model(LocalConfig(args.model, dtype=args.dtype, device="cpu"))
    rows = measure("in-process", local, args, False)
    del local
    # The cluster rows run in a process of their own with OMP_WAIT_POLICY=PASSIVE, as
    # `moe-cluster serve --backend cluster` runs its router (see cluster.cli): a router that waits on
    # hosts should not spin on the cores they share.
    subprocess.run([sys.executable, *sys.argv, "--part", "cluster"], check=True,
                   env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    rows += [Row(**r) for r in json.loads(args.out.with_suffix(".cluster.json").read_text())]
    text = table(rows)
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"), f"{args.model.name}, {args.dtype}, {torch.get_num_threads()} router "
         f"threads, {args.hosts} hosts x 1 CPU")
    log(f"wrote {args.out}.md, .json and .png")


if __name__ == "__main__":
    main()
