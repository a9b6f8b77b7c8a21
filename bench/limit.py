"""The limit row's measurement: the matmuls alone an ideal engine must do for a workload, on this machine.

`record_routing` runs the workload's prompts through the in-process engine (the same model, gate and greedy
decoding the servers run) and keeps the rows each expert received per step; `time_limit` times, for those
rows, every layer's projections, each expert and the LM head with the fastest kernel an engine here can use.
`bench/serve.py` turns the timings into its limit row.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LIMIT_DECODE_STEPS = 8  # decode steps of the recorded routing the limit times, evenly spaced over the run


@dataclass
class Routing:
    """Rows the gate sent to each expert in a real run of the workload: [layer][expert] per step."""

    prefill: list[list[int]]
    decode: list[list[list[int]]]

    def sample(self, count: int) -> list[list[list[int]]]:
        """`count` decode steps spread evenly over the run (all of them when there are fewer)."""
        n = len(self.decode)
        return [self.decode[i * n // count] for i in range(count)] if n > count else list(self.decode)

    def describe(self, sampled: int) -> str:
        rows = [r for step in self.decode for layer in step for r in layer if r]
        active = statistics.mean(sum(1 for r in layer if r) for step in self.decode for layer in step)
        return (f"{sampled} of {len(self.decode)} decode steps; {min(rows)}-{max(rows)} rows per active expert, "
                f"{active:.1f} of {len(self.decode[0][0])} experts active per layer")


def record_routing(model_dir: Path, dtype: str, prompts: list[list[int]], new_tokens: int, device: str = "cpu"
                   ) -> Routing:
    """Run the prompts through the in-process engine, greedy and EOS ignored as the servers are asked to (a
    request's tokens never depend on its batch), and keep the rows each expert received per step: the
    counter the servers export (`CountingExperts`), read after each step."""
    from cluster.deploy import LocalConfig, build_engine, load_local_model
    from mixtral.block import Experts
    from mixtral.config import ModelConfig
    from router.engine import EngineConfig
    from router.expert_load import CountingExperts
    from router.kv_cache import CacheConfig
    from router.sampler import SamplingParams

    config = ModelConfig.from_json(model_dir / "config.json")
    counter: list[CountingExperts] = []

    def wrap(experts: Experts) -> Experts:
        counter.append(CountingExperts(experts, config.num_hidden_layers, config.num_local_experts))
        return counter[0]

    model = load_local_model(LocalConfig(model_dir, dtype=dtype, device=device), wrap)
    concurrency, prompt_len = len(prompts), len(prompts[0])
    engine = build_engine(model, CacheConfig(num_slots=concurrency, max_seq_len=prompt_len + new_tokens + 2),
                          EngineConfig(max_batch_tokens=concurrency * prompt_len))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add(str(i), prompt, params)
    steps, before = [], counter[0].snapshot()
    while engine.running:
        engine.step()
        after = counter[0].snapshot()
        steps.append((after - before).tolist())
        before = after
    prefill, *decode = steps
    k = config.num_experts_per_tok
    if sum(prefill[0]) != concurrency * prompt_len * k or len(decode) != new_tokens - 1 or \
            any(sum(layer) != concurrency * k for step in decode for layer in step):
        raise RuntimeError("the recorded routing is not one prefill and then one decode step per new token")
    return Routing(prefill, decode)


def time_limit(model_dir: Path, dtype: str, concurrency: int, prompt_len: int, routing: Routing,
               device: str = "cpu") -> tuple[Timing, Timing, int]:
    """Time the matmuls of the workload alone, on the checkpoint's own weights: every layer's and every
    expert's distinct matrices, as an engine must read them (reusing one layer's would let the 32 MiB
    L3 cache hold an expert, which no real step gets), each expert on the rows the model routes to it in
    this workload (`routing`). Inputs are made before the clock starts. The matmuls run with each kernel
    an engine here can use: torch's F.linear, oneDNN on pre-packed weights and, for bf16 where built,
    moe-cluster's own tiled kernel; each phase is timed with the fastest. On a GPU: cuBLAS through F.linear,
    each phase's matmuls captured once in a CUDA graph and replayed, so the clock sees the GPU's work and no
    kernel-launch gaps. -> (the prefill's time, a decode step's time, the number of decode steps timed)."""
    from mixtral import cpu_kernels
    from mixtral.checkpoint import Checkpoint
    from mixtral.config import ModelConfig
    from mixtral.linear import Layout, Projection, lay_out

    c = ModelConfig.from_json(model_dir / "config.json")
    checkpoint = Checkpoint(model_dir, c)
    dt = getattr(torch, dtype)
    d, f = c.hidden_size, c.intermediate_size
    gpu = torch.device(device).type == "cuda"
    plain = limit_weights(checkpoint, c, dt, device)
    layouts = [Layout.PLAIN] if gpu else \
        [Layout.PLAIN, Layout.ONEDNN] + ([Layout.TILES] if cpu_kernels.tiles_for(plain[1]) else [])

    def laid(w: torch.Tensor, layout: Layout) -> Projection:  # a weight the layout cannot take stays plain
        if layout is Layout.TILES:  # as the engine tiles it: the gate padded to whole tiles
            tiled = Projection.of(w)
            return tiled if tiled.layout is Layout.TILES else Projection(w)
        return Projection(lay_out(w, layout), layout)

    kernels = [([(laid(qkv, lay), laid(o, lay), laid(gate, lay), [(laid(a, lay), laid(b, lay)) for a, b in experts])
                 for qkv, o, gate, experts in plain[0]], laid(plain[1], lay)) for lay in layouts]

    # One buffer per operand, as large as the prefill needs; each step's inputs are views made here, so the
    # clock sees only the matmuls.
    tokens = max(concurrency * prompt_len, concurrency)
    most = max(rows for step in [routing.prefill, *routing.decode] for layer in step for rows in layer)
    x, attn = torch.randn(tokens, d, dtype=dt, device=device), torch.randn(tokens, c.q_size, dtype=dt, device=device)
    h, u = torch.randn(most, d, dtype=dt, device=device), torch.randn(most, f, dtype=dt, device=device)
    head_in = torch.randn(concurrency, d, dtype=dt, device=device)

    def plan(step: list[list[int]], step_tokens: int) -> Any:
        return (x[:step_tokens], attn[:step_tokens],
                [[(e, h[:rows], u[:rows]) for e, rows in enumerate(layer) if rows] for layer in step])

    def matmuls(plans: list[Any], weights: Any) -> None:
        layers, lm_head = weights
        for xs, attns, experts_rows in plans:
            for (w_qkv, w_o, w_gate, experts), active in zip(layers, experts_rows, strict=True):
                w_qkv(xs)
                w_o(attns)
                w_gate(xs)
                for e, hs, us in active:
                    w13, w2 = experts[e]
                    w13(hs)
                    w2(us)
            lm_head(head_in)

    def run(plans: list[Any], weights: Any) -> float:
        """Seconds per step, over the planned steps."""
        start = time.perf_counter()
        matmuls(plans, weights)
        return (time.perf_counter() - start) / len(plans)

    def graphed(plans: list[Any]) -> Any:
        """On a GPU: the plans' matmuls captured in one CUDA graph; run(graph) -> seconds per step."""
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            matmuls(plans, kernels[0])  # cuBLAS picks and caches its kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            matmuls(plans, kernels[0])

        def replay(_: Any) -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            return (time.perf_counter() - start) / len(plans)

        return replay

    prefill_plan = [plan(routing.prefill, concurrency * prompt_len)]
    decode_plans = [plan(step, concurrency) for step in routing.sample(LIMIT_DECODE_STEPS)]
    # Each phase with whichever kernel is fastest for it; kernels take turns in every round, so a drift of
    # the machine's speed (20-50% between runs here) reaches them all alike.
    if gpu:
        prefill = fastest(graphed(prefill_plan), kernels, rounds=20, budget_s=1.0)
        decode = fastest(graphed(decode_plans), kernels, rounds=20, budget_s=1.0)
        return prefill, decode, len(decode_plans)
    for weights in kernels:
        run(decode_plans[:1], weights)  # warm-up
    prefill = fastest(lambda w: run(prefill_plan, w), kernels, rounds=3, budget_s=0.0)
    decode = fastest(lambda w: run(decode_plans, w), kernels, rounds=7, budget_s=3.0)
    return prefill, decode, len(decode_plans)


@dataclass
class Timing:
    """One phase's time with its fastest kernel: the median of its rounds and their range, seconds."""

    median: float
    low: float
    high: float
    rounds: int


def fastest(run: Any, kernels: list[Any], rounds: int, budget_s: float) -> Timing:
    """Time `run(kernel)` for every kernel in turn, round after round: at least `rounds` rounds and until
    `budget_s` has passed; the kernel with the lowest median wins."""
    times: list[list[float]] = [[] for _ in kernels]
    start = time.perf_counter()
    while len(times[0]) < rounds or time.perf_counter() - start < budget_s:
        for samples, weights in zip(times, kernels, strict=True):
            samples.append(run(weights))
    best = min(times, key=statistics.median)
    return Timing(statistics.median(best), min(best), max(best), len(best))


def limit_weights(checkpoint: Any, c: Any, dt: torch.dtype, device: str = "cpu") -> tuple[list[Any], torch.Tensor]:
    """Per layer (qkv, o, gate, [(w13, w2) per expert]) and the LM head, read from the checkpoint."""
    from mixtral.checkpoint import EMBED, LM_HEAD, expert_tensor_names, layer_tensor_names

    layers = []
    for layer in range(c.num_hidden_layers):
        names = layer_tensor_names(c, layer)
        t = checkpoint.load([names[n] for n in ("wq", "wk", "wv", "wo", "gate")], dt, device)
        experts = []
        for expert in range(c.num_local_experts):
            ex = expert_tensor_names(c, layer, expert)
            w = checkpoint.load(ex.values(), dt, device)
            experts.append((torch.cat((w[ex["w1"]], w[ex["w3"]])), w[ex["w2"]]))
        layers.append((torch.cat([t[names[n]] for n in ("wq", "wk", "wv")]), t[names["wo"]], t[names["gate"]], experts))
    head_name = EMBED if c.tie_word_embeddings else LM_HEAD
    return layers, checkpoint.load([head_name], dt, device)[head_name]


# --- moe-cluster over gRPC ---------------------------------------------------------------------------
