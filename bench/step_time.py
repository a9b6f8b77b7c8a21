"""Time one prefill and one decode step of the in-process engine (no peers: see issue 5's benchmark).

    .venv/bin/python bench/step_time.py --model models/mini [--dtype float32 bfloat16] [--batch 1 32]

Prints, per dtype and batch size, the median time of a prefill of `--prompt-len` tokens per
sequence and of one decode step, and the decode rate in output tokens per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from cluster.deploy import LocalConfig, build_engine, load_local_model
from mixtral.allocator import keep_freed_memory
from router.engine import EngineConfig
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams


def measure(model_dir: Path, dtype: str, batch: int, prompt_len: int, decode_steps: int) -> tuple[float, float]:
    model = load_local_model(LocalConfig(model_dir, dtype=dtype, device="cpu"))
    keep_freed_memory()  # as `moe-cluster serve` does after its load
    generator = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, model.config.vocab_size, (prompt_len - 1,), generator=generator).tolist()]
               for _ in range(batch)]
    params = SamplingParams(max_new_tokens=decode_steps + 1, temperature=0.0, ignore_eos=True)
    prefill, decode = [], []
    for _ in range(2):  # the first round warms up allocators and kernels
        engine = build_engine(model, CacheConfig(num_slots=batch, max_seq_len=prompt_len + decode_steps + 2),
                              EngineConfig(max_batch_tokens=batch * prompt_len))
        for i, p in enumerate(prompts):
            engine.add(str(i), p, params)
        start = time.perf_counter()
        engine.step()
        prefill.append(time.perf_counter() - start)
        while engine.running:
            start = time.perf_counter()
            engine.step()
            decode.append(time.perf_counter() - start)
    return prefill[-1], statistics.median(decode[decode_steps:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, prompt {args.prompt_len} tokens", file=sys.stderr)
    print("| dtype | batch | prefill (ms) | decode step (ms) | decode tok/s |")
    print("| --- | --- | --- | --- | --- |")
    for dtype in args.dtype:
        for batch in args.batch:
            prefill, step = measure(args.model, dtype, batch, args.prompt_len, args.decode_steps)
            print(f"| {dtype} | {batch} | {prefill * 1e3:.0f} | {step * 1e3:.1f} | {batch / step:.1f} |", flush=True)


if __name__ == "__main__":
    main()
