"""End-to-end serving benchmark: moe-cluster over its real gRPC API beside its peers, in one run.

    .venv/bin/python bench/serve.py --model models/mini [--quick] [--dtype float32 bfloat16] [--device cuda]
        [--concurrency 1 8 32] [--systems limit moe-local moe-cluster transformers vllm llama.cpp]
        [--served-runs 3]

Workload: C clients at once, each a 128-token prompt (random ids of the real vocabulary) and 128
new tokens, greedy, EOS ignored. Output tokens/s = C * new tokens / wall time of the whole run
(prefill included). Rows:
  limit          only the matmuls an ideal engine must do for the same workload (QKV and output
                 projections, the gate, each expert on the rows it receives, the LM head on the
                 last prompt position in prefill and on every row in decode), timed with torch here,
                 before and again after the moe-cluster rows; the row is the faster sitting
  moe-local      `moe-cluster serve --backend local`, C concurrent streaming gRPC clients; the median of
                 --served-runs runs (3; --quick 1) on one server, the note giving their spread
  moe-cluster    `moe-cluster serve --backend cluster --hosts 2` (local Ray, 2 expert hosts), likewise
  transformers   HF `generate` on the same checkpoint and prompts, batched
  vllm           vLLM's CPU build, offline `LLM.generate`, in its own venv: set VLLM_PYTHON=<venv>/bin/python
  llama.cpp      its `llama-batched-bench` tool (own random prompts of the same shape, decode-only speed in the
                 note): set LLAMA_BENCH=<path to the tool> and LLAMA_GGUF_DIR=<dir holding <model>-bf16.gguf and
                 <model>-f32.gguf>, used for bfloat16 and float32
  Peers not installed (variables unset) give a row that says so; bench/README.md has the install steps.
With --device cuda (bfloat16 unless --dtype) the limit, the servers (router and, for moe-cluster, the two hosts
sharing the GPU) and transformers run on the GPU; the limit replays its matmuls as one CUDA graph.
The limit row is measured by bench/limit.py. Writes bench/results/serve.json, serve.md and serve.png; progress
on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mixtral.allocator import keep_freed_memory

if TYPE_CHECKING:
    from limit import Routing

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    system: str
    dtype: str
    concurrency: int
    output_tok_s: float
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    itl_p50_s: float | None = None
    itl_p99_s: float | None = None
    note: str = ""


@dataclass
class Workload:
    prompts: list[list[int]]
    new_tokens: int
    routing: Routing | None = None  # recorded for the limit row: see limit.record_routing


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return [[1, *torch.randint(3, vocab, (length - 1,), generator=generator).tolist()] for _ in range(count)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the limit: matmuls alone ----------------------------------------------------------------------


def limit_row(model_dir: Path, dtype: str, concurrency: int, prompt_len: int, new_tokens: int,
              routing: Routing, device: str) -> Row:
    """The limit as output tokens/s: the prefill's matmuls, then new_tokens - 1 decode steps' (bench/limit.py)."""
    from limit import time_limit

    prefill, decode, sampled = time_limit(model_dir, dtype, concurrency, prompt_len, routing, device)
    total = prefill.median + (new_tokens - 1) * decode.median  # the prefill yields the first token
    return Row("limit (matmuls alone)", dtype, concurrency, concurrency * new_tokens / total,
               ttft_p50_s=prefill.median, itl_p50_s=decode.median,
               note=f"experts on the rows the model routes ({routing.describe(sampled)}); the "
                    f"checkpoint's distinct weights; median of {decode.rounds} interleaved rounds, decode step "
                    f"{decode.low * 1e3:.1f}-{decode.high * 1e3:.1f} ms, prefill {prefill.low:.3f}-"
                    f"{prefill.high:.3f} s" + ("; one CUDA graph" if device != "cpu" else ""))


# --- moe-cluster over gRPC ---------------------------------------------------------------------------


def moe_row(system: str, model_dir: Path, dtype: str, work: Workload, extra: list[str], runs: int) -> Row:
    """`runs` runs of the workload on one server after a warm-up request; the row is the median run (by wall
    time), its note the spread: one run on this machine moves by up to 15-25% with the machine's phase."""
    concurrency = len(work.prompts)
    server = start_server(model_dir, dtype, concurrency, work, extra)
    try:
        port = server[1]
        run_clients(port, work.prompts[:1], 4)  # warm-up: channels, kernels, allocator
        results = []
        for i in range(runs):
            results.append(run_clients(port, work.prompts, work.new_tokens))
            if runs > 1:
                log(f"  run {i + 1} of {runs}: {concurrency * work.new_tokens / results[-1][2]:.1f} output tok/s")
    finally:
        stop_server(server[0])
    ttfts, itls, wall = sorted(results, key=lambda result: result[2])[runs // 2]
    rates = sorted(concurrency * work.new_tokens / result[2] for result in results)
    note = f"median of {runs} runs on one server ({rates[0]:.1f}-{rates[-1]:.1f})" if runs > 1 else ""
    return Row(system, dtype, concurrency, concurrency * work.new_tokens / wall, percentile(ttfts, 0.5),
               percentile(ttfts, 0.99), percentile(itls, 0.5), percentile(itls, 0.99), note=note)


def start_server(model_dir: Path, dtype: str, concurrency: int, work: Workload, extra: list[str]
                 ) -> tuple[subprocess.Popen[str], int]:
    prompt_len = len(work.prompts[0])
    argv = [sys.executable, "-m", "cluster.cli", "serve", "--model", str(model_dir), "--dtype", dtype, "--port", "0",
            "--metrics-port", "0", "--max-running", str(max(concurrency, 1)), "--max-prompt-tokens",
            str(prompt_len), "--max-new-tokens-cap", str(work.new_tokens), "--max-batch-tokens",
            str(max(2048, concurrency * prompt_len)), *extra]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"serving .* on [^:]+:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    raise RuntimeError(f"server exited with {proc.wait()} before serving: {' '.join(argv)}")


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_clients(port: int, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], list[float], float]:
    """Stream every prompt at once, each from a client with its own channel: (TTFTs, inter-token gaps, wall
    seconds). The clients share one asyncio loop in this process: they run on the server's cores, and 32
    threads with blocking streams took 0.7-0.8 CPU-s of a C = 32 run where the loop takes 0.3."""
    import grpc

    from protos import router_pb2, router_pb2_grpc

    ttfts: list[float] = []
    itls: list[float] = []
    errors: list[str] = []

    async def one(prompt: list[int]) -> None:
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), max_new_tokens=new_tokens,
                                             ignore_eos=True, sampling=router_pb2.SamplingParameters(temperature=0))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            start = last = time.perf_counter()
            count = 0
            async for part in router_pb2_grpc.GenerationStub(channel).GenerateStream(request, timeout=3600):
                now = time.perf_counter()
                for _ in part.token_ids:
                    (ttfts if count == 0 else itls).append(now - (start if count == 0 else last))
                    count += 1
                last = now
            if count != new_tokens:
                errors.append(f"got {count} tokens, wanted {new_tokens}")

    async def all_clients() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - start

    wall = asyncio.run(all_clients())
    if errors:
        raise RuntimeError(errors[0])
    return ttfts, itls, wall


# --- peers -------------------------------------------------------------------------------------------


def transformers_row(model_dir: Path, dtype: str, work: Workload, device: str) -> Row:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor(work.prompts, device=device)
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:1, :8], max_new_tokens=2, **kwargs)  # warm-up
        kwargs["attention_mask"] = torch.ones_like(ids)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        sync(device)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=work.new_tokens, min_new_tokens=work.new_tokens, **kwargs)
        sync(device)
        wall = time.perf_counter() - start
    itl = (wall - ttft) / max(1, work.new_tokens - 1)
    return Row("transformers generate", dtype, len(work.prompts), len(work.prompts) * work.new_tokens / wall,
               ttft_p50_s=ttft, itl_p50_s=itl, note="batched; ttft = whole prefill")


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def vllm_row(model_dir: Path, dtype: str, work: Workload) -> Row:
    script = REPO / "bench" / "peers" / "vllm_run.py"
    python = os.environ.get("VLLM_PYTHON")
    if not python:
        return Row("vLLM CPU", dtype, len(work.prompts), float("nan"), note="not installed: set VLLM_PYTHON")
    out = subprocess.run([python, str(script), str(model_dir), dtype, json.dumps(work.prompts), str(work.new_tokens)],
                         capture_output=True, text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4"})
    match = re.search(r"^WALL_SECONDS (\S+)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not match:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-15:])
        raise RuntimeError(f"{script} exited {out.returncode} without a result:\n{tail}")
    wall = float(match.group(1))
    return Row("vLLM CPU", dtype, len(work.prompts), len(work.prompts) * work.new_tokens / wall,
               note="offline LLM, its default CPU binding")


def llamacpp_row(model_dir: Path, dtype: str, work: Workload) -> Row:
    from peers import llamacpp_run

    concurrency, tool, gguf_dir = len(work.prompts), os.environ.get("LLAMA_BENCH"), os.environ.get("LLAMA_GGUF_DIR")
    if not tool or not gguf_dir:
        return Row("llama.cpp", dtype, concurrency, float("nan"),
                   note="not installed: set LLAMA_BENCH and LLAMA_GGUF_DIR (bench/README.md)")
    gguf = llamacpp_run.gguf_path(Path(gguf_dir), model_dir, dtype)
    if not gguf.exists():
        return Row("llama.cpp", dtype, concurrency, float("nan"), note=f"no {gguf}: convert it (bench/README.md)")
    threads = torch.get_num_threads()
    r = llamacpp_run.run(Path(tool), gguf, threads, concurrency, len(work.prompts[0]), work.new_tokens)
    return Row("llama.cpp", dtype, concurrency, concurrency * work.new_tokens / r["t"], ttft_p50_s=r["t_pp"],
               itl_p50_s=r["t_tg"] / max(1, work.new_tokens - 1),
               note=f"llama-batched-bench, {threads} threads, its own random prompts; ttft = whole prefill "
                    f"({r['speed_pp']:.0f} prompt tok/s); decode alone {r['speed_tg']:.1f} tok/s")


def run_all(args: argparse.Namespace) -> list[Row]:
    from limit import record_routing

    from mixtral.config import ModelConfig

    vocab = ModelConfig.from_json(args.model / "config.json").vocab_size
    rows: list[Row] = []
    served = [i for i, system in enumerate(args.systems) if system.startswith("moe-")]
    for dtype in args.dtype:
        for concurrency in args.concurrency:
            work = Workload(make_prompts(concurrency, args.prompt_len, vocab), args.new_tokens)
            if "limit" in args.systems:
                log(f"recording the workload's routing: the in-process engine, {dtype}, C={concurrency}")
                work.routing = record_routing(args.model, dtype, work.prompts, work.new_tokens, args.device)
            limit: Row | None = None
            for i, system in enumerate(args.systems):
                log(f"{system} {dtype} C={concurrency}")
                row = run_system(system, args, dtype, work)
                if row is not None:
                    rows.append(row)
                    log(f"  {row.output_tok_s:.1f} output tok/s {row.note}")
                    limit = row if system == "limit" else limit
                if limit is not None and served and i == served[-1]:
                    # The limit times seconds, the served rows minutes, and this machine's speed drifts
                    # 20-50% between phases: time it again once they ran and keep the stricter sitting.
                    log(f"limit {dtype} C={concurrency}, again after the moe-cluster rows")
                    again = run_system("limit", args, dtype, work)
                    assert again is not None
                    rows[rows.index(limit)] = limit = stricter(limit, again)
                    log(f"  {limit.output_tok_s:.1f} output tok/s {limit.note}")
    return rows


def stricter(before: Row, after: Row) -> Row:
    """The limit row of the faster sitting (the higher bar), its note naming the other sitting's result."""
    kept, other, when = (before, after, "after") if before.output_tok_s >= after.output_tok_s else \
        (after, before, "before")
    assert other.itl_p50_s is not None
    kept.note += (f"; the stricter of two sittings: {when} the moe-cluster rows it read {other.output_tok_s:.1f} "
                  f"output tok/s, decode step {other.itl_p50_s * 1e3:.0f} ms")
    return kept


def run_system(system: str, args: argparse.Namespace, dtype: str, work: Workload) -> Row | None:
    if system == "limit":
        assert work.routing is not None
        return limit_row(args.model, dtype, len(work.prompts), args.prompt_len, work.new_tokens, work.routing,
                         args.device)
    device = ["--device", args.device]
    if system == "moe-local":
        return moe_row("moe-cluster local", args.model, dtype, work, ["--backend", "local", *device],
                       args.served_runs)
    if system == "moe-cluster":
        gpus = ["--gpus-per-host", "0.5"] if args.device != "cpu" else []  # the two hosts share the one GPU
        return moe_row("moe-cluster cluster (2 hosts)", args.model, dtype, work,
                       ["--backend", "cluster", "--hosts", "2", "--cpus-per-host", "1", *gpus, *device],
                       args.served_runs)
    if system == "transformers":
        return transformers_row(args.model, dtype, work, args.device)
    if system in ("vllm", "llama.cpp") and args.device != "cpu":
        return Row(system, dtype, len(work.prompts), float("nan"), note="its CPU build: not run beside GPU rows")
    if system == "vllm":
        return vllm_row(args.model, dtype, work)
    if system == "llama.cpp":
        return llamacpp_row(args.model, dtype, work)
    raise ValueError(f"unknown system {system}")


def table(rows: list[Row]) -> str:
    def ms(v: float | None) -> str:
        return "" if v is None else f"{v * 1e3:.0f}" if v >= 0.1 else f"{v * 1e3:.1f}"  # GPU steps take a few ms

    limits = {(r.dtype, r.concurrency): r.output_tok_s for r in rows if r.system.startswith("limit")}

    def of_limit(r: Row) -> str:  # output tok/s as a share of the limit row of the same dtype and concurrency
        limit = limits.get((r.dtype, r.concurrency))
        return "" if limit is None or r.output_tok_s != r.output_tok_s else f"{r.output_tok_s / limit:.2f}x"

    lines = ["| system | dtype | C | output tok/s | of the limit | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) "
             "| ITL p99 (ms) | note |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.system} | {r.dtype} | {r.concurrency} | {r.output_tok_s:.1f} | {of_limit(r)} | "
                     f"{ms(r.ttft_p50_s)} | {ms(r.ttft_p99_s)} | {ms(r.itl_p50_s)} | {ms(r.itl_p99_s)} | {r.note} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r.dtype for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        mine = [r for r in rows if r.dtype == dtype and r.output_tok_s == r.output_tok_s]  # drop NaN rows
        systems = list(dict.fromkeys(r.system for r in mine))
        levels = sorted({r.concurrency for r in mine})
        width = 0.8 / max(1, len(systems))
        for i, system in enumerate(systems):
            by_c = {r.concurrency: r.output_tok_s for r in mine if r.system == system}
            xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(levels))]
            ax.bar(xs, [by_c.get(c, 0) for c in levels], width, label=system)
        ax.set_xticks(range(len(levels)), [f"C={c}" for c in levels])
        ax.set_ylabel("output tokens/s (higher is better)")
        ax.set_title(dtype)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="C = 1 and 8, 32 new tokens, float32 unless --dtype")
    parser.add_argument("--dtype", nargs="+", help="default: float32 bfloat16")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--systems", nargs="+",
                        default=["limit", "moe-local", "moe-cluster", "transformers", "vllm", "llama.cpp"])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: every system but the CPU-only peers on the GPU")
    parser.add_argument("--served-runs", type=int, default=None,
                        help="runs of the workload per moe-cluster server, the median reported (default 3; --quick 1)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve")
    args = parser.parse_args()
    if args.new_tokens < 2 or args.prompt_len < 1 or min(args.concurrency) < 1:
        parser.error("--new-tokens must be at least 2 (one decode step), --prompt-len and --concurrency at least 1")
    if args.quick:
        args.concurrency, args.new_tokens = [1, 8], 32
    args.served_runs = args.served_runs or (1 if args.quick else 3)
    if args.served_runs < 1:
        parser.error("--served-runs must be at least 1")
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: use cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    if args.device == "cuda":
        args.dtype = args.dtype or ["bfloat16"]
    args.dtype = args.dtype or (["float32"] if args.quick else ["float32", "bfloat16"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The rows timed in this process (the limit, transformers) under the allocator settings the servers use.
    keep_freed_memory()
    rows = run_all(args)
    text = table(rows)
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    log(f"wrote {args.out}.json, .md and .png")


if __name__ == "__main__":
    main()
