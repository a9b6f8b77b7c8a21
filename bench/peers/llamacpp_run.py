"""Run the serving workload on llama.cpp's `llama-batched-bench` (built by hand; see bench/README.md).

    LLAMA_BENCH=/path/llama-batched-bench LLAMA_GGUF_DIR=/dir/with/mini-bf16.gguf,mini-f32.gguf \\
        .venv/bin/python bench/serve.py --model models/mini --systems llama.cpp

The tool runs C sequences at once: one prefill of C prompts of P random tokens (its own, not ours: only
the shape matters), then `-ntg` batched decode steps for all C, no sampling, and reports the prefill and
decode times. G new tokens take a prefill (which yields the first) and G - 1 decode steps, as in
transformers' `generate` and vLLM, so it runs `-ntg G-1`; output tok/s = C * G / (prefill + decode), the
same definition as the other rows of serve.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ATTEMPTS = 3
GGUF_TYPES = {"bfloat16": "bf16", "float32": "f32"}  # serve.py dtype -> convert_hf_to_gguf.py --outtype


def gguf_path(gguf_dir: Path, model_dir: Path, dtype: str) -> Path:
    """`<dir>/<checkpoint folder name>-<bf16|f32>.gguf`, e.g. mini-bf16.gguf for models/mini."""
    return gguf_dir / f"{model_dir.resolve().name}-{GGUF_TYPES[dtype]}.gguf"


def run(tool: Path, gguf: Path, threads: int, concurrency: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """One `llama-batched-bench` run of the workload: its JSONL result (t_pp, t_tg, t in seconds, speed_tg, ...)."""
    steps = new_tokens - 1  # decode steps after the prefill
    argv = [str(tool), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
            "-c", str(concurrency * (prompt_len + new_tokens)),  # with a smaller context the tool skips the run
            "-npp", str(prompt_len), "-ntg", str(steps), "-npl", str(concurrency), "--output-format", "jsonl"]
    for attempt in range(1, ATTEMPTS + 1):
        out = subprocess.run(argv, capture_output=True, text=True)
        lines = (out.stdout + "\n" + out.stderr).splitlines()
        results = [json.loads(line) for line in lines if line.startswith("{") and '"speed_tg"' in line]
        if out.returncode != 0 or results or attempt == ATTEMPTS:
            break
        # Its logger prints from a thread that exit does not wait for (common/log.cpp leaks the logger on
        # purpose and says logs may be lost): on a busy machine the result line was once lost, exit 0.
        print(f"llama-batched-bench printed no result (exit 0), attempt {attempt} of {ATTEMPTS}; again",
              file=sys.stderr, flush=True)
    if out.returncode != 0 or len(results) != 1:
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode} with {len(results)} result lines:\n{tail}")
    result: dict[str, float] = results[0]
    if (result["pl"], result["pp"], result["tg"]) != (concurrency, prompt_len, steps):
        raise RuntimeError(f"llama-batched-bench ran another workload than asked: {result}")
    return result
