"""`moe-cluster load | plan | capacity`: their flags, and the calls into load.py, planner.py, capacity.py.

Kept out of cli.py so that the command line's main module only registers the subcommands. Nothing
here prints: results go to the `show` callable (stdout) and notes to `note` (stderr), which cli.py
passes in. Bad input raises ValueError (or OSError), which cli.py turns into one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.admin_commands import add_client_flags, export_live_load, window_seconds
from cluster.arguments import count, positive_float, positive_int
from cluster.capacity import CapacityConfig, plan_capacity, read_host_rate
from cluster.deploy import LocalConfig
from cluster.load import ExpertLoad, LoadFileError, MeasureConfig, measure_load, read_prompts
from cluster.placement import PlacementPlan
from cluster.planner import PlannerConfig, compare_with_round_robin, plan_placement
from mixtral.config import DTYPES, ModelConfig

Show = Callable[[str], None]


def add_planning_commands(commands: argparse._SubParsersAction[Any], show: Show, note: Show) -> None:
    """Register `load`, `plan` and `capacity`; their results go to `show`, progress to `note`."""
    _add_load(commands).set_defaults(run=lambda args: run_load(args, note))
    _add_plan(commands).set_defaults(run=lambda args: run_plan(args, show, note))
    _add_capacity(commands).set_defaults(run=lambda args: run_capacity(args, show, note))


def _add_load(commands: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = commands.add_parser(
        "load", help="rows per (layer, expert): measured here on a prompt file, or exported from a running router")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="model directory (config.json + safetensors): measure here")
    where.add_argument("--server", metavar="HOST:PORT", help="export the live load of this router (Admin.GetLoad)")
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE.jsonl",
                   help='with --model: one {"prompt": ...}, {"token_ids": [...]} or {"messages": [...]} per line, '
                   'optionally with "max_new_tokens"')
    p.add_argument("--window", type=window_seconds, default=None, metavar="SECONDS",
                   help="with --server: the rows of the last SECONDS (default 300; 0: since the router started)")
    p.add_argument("--out", type=Path, required=True, metavar="load.json", help="load file to write")
    p.add_argument("--max-new-tokens", type=positive_int, default=1,
                   help="greedy tokens per prompt (1: count the prompt tokens only)")
    p.add_argument("--batch", type=positive_int, default=8, help="prompts run together")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--tokenizer", default=None, help="as for generate")
    add_client_flags(p)
    return p


def _add_plan(commands: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = commands.add_parser(
        "plan", help="place experts on hosts from a load file: replicate hot experts, balance every layer")
    p.add_argument("--load", type=Path, required=True, metavar="load.json", help="from `moe-cluster load`")
    _add_expert_size(p, required=True)
    p.add_argument("--hosts", type=positive_int, required=True, help="expert hosts")
    p.add_argument("--host-memory", type=positive_int, default=None, metavar="BYTES",
                   help="expert-weight budget of each host (default: unlimited)")
    p.add_argument("--spare-slots", type=count, default=0, metavar="K",
                   help="up to K replicas per layer beyond one per expert, used where they help")
    p.add_argument("--out", type=Path, required=True, metavar="plan.json", help="plan to write (for --plan)")
    p.add_argument("--plot", type=Path, default=None, metavar="PLAN.png",
                   help="draw the load and the per-host load of round-robin beside the plan")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def _add_capacity(commands: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = commands.add_parser(
        "capacity", help="how many hosts, with which replicas, serve a target rate of tokens per second")
    p.add_argument("--load", type=Path, required=True, metavar="load.json", help="from `moe-cluster load`")
    p.add_argument("--target-tokens-per-s", type=positive_float, required=True, metavar="X")
    p.add_argument("--measured", type=Path, required=True, metavar="bench.json",
                   help='bench/dispatch.py JSON (its "in-process" rows) or {"host_rows_per_s": R}')
    p.add_argument("--spare-slots", type=count, default=None, metavar="K",
                   help="replicas per layer beyond one per expert (default: as many as hosts)")
    p.add_argument("--max-hosts", type=positive_int, default=256, help="give up beyond this many hosts")
    _add_expert_size(p, required=False)
    p.add_argument("--host-memory", type=positive_int, default=None, metavar="BYTES",
                   help="expert-weight budget of each host (needs --model or --expert-bytes)")
    p.add_argument("--out", type=Path, default=None, metavar="plan.json", help="also write the chosen plan")
    p.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    return p


def _add_expert_size(p: argparse.ArgumentParser, required: bool) -> None:
    size = p.add_mutually_exclusive_group(required=required)
    size.add_argument("--model", type=Path, help="model directory: expert size from its config.json and --dtype")
    size.add_argument("--expert-bytes", type=positive_int, default=None, metavar="N",
                      help="bytes of one (layer, expert)'s weights")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="serving dtype (with --model)")


def run_load(args: argparse.Namespace, note: Show) -> int:
    if args.server is not None:
        if args.prompts is not None:
            raise ValueError("moe-cluster load: --prompts is for --model (a router's load is what it served)")
        return export_live_load(args, note)
    if args.prompts is None:
        raise ValueError("moe-cluster load: --model needs --prompts (the prompt file to run)")
    if args.window is not None:
        raise ValueError("moe-cluster load: --window is for --server (an offline run counts all of its prompts)")
    cfg = MeasureConfig(LocalConfig(args.model, dtype=args.dtype, device=args.device),
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch, tokenizer=args.tokenizer)
    load = measure_load(read_prompts(args.prompts), cfg)
    load.save(args.out)
    hottest = max(max(rows) / max(1, sum(rows)) for rows in load.rows)
    note(f"wrote {args.out}: {load.num_layers} layers x {load.num_experts} experts, {load.tokens} tokens in "
         f"{load.window_s:.2f} s; the hottest expert takes {100 * hottest:.1f}% of its layer's rows")
    return 0


def run_plan(args: argparse.Namespace, show: Show, note: Show) -> int:
    load = ExpertLoad.read(args.load)
    cfg = PlannerConfig(args.hosts, _expert_bytes(args, load), args.host_memory, args.spare_slots)
    plan = plan_placement(load.rows, cfg)
    plan.save(args.out)
    report = compare_with_round_robin(plan, load.rows)
    if args.plot is not None:
        _plot(plan, load, args.plot)
    show(json.dumps(report.to_dict()) if args.json else report.to_text())
    note(f"wrote {args.out}" + (f" and {args.plot}" if args.plot is not None else ""))
    return 0


def _plot(plan: PlacementPlan, load: ExpertLoad, path: Path) -> None:
    try:  # matplotlib is an optional dependency (the `bench` extra); planning works without it
        from cluster.plan_plot import save_plan_plot
    except ImportError as err:
        raise ValueError(f"--plot needs matplotlib ({err}): pip install 'moe-cluster[bench]'") from None
    save_plan_plot(plan, load.rows, path)


def run_capacity(args: argparse.Namespace, show: Show, note: Show) -> int:
    load = ExpertLoad.read(args.load)
    rate = read_host_rate(args.measured, load.rows_per_token())
    if args.host_memory is not None and args.model is None and args.expert_bytes is None:
        raise ValueError("--host-memory needs --model or --expert-bytes (the size of one expert)")
    expert_bytes = _expert_bytes(args, load) if args.host_memory is not None else 1
    cfg = CapacityConfig(args.target_tokens_per_s, rate.rows_per_s, args.max_hosts, args.spare_slots,
                         expert_bytes, args.host_memory)
    answer = plan_capacity(load.rows, load.token_count(), cfg)
    if args.out is not None:
        answer.plan.save(args.out)
        note(f"wrote {args.out}")
    result = {**answer.to_dict(), "host_rows_per_s": round(rate.rows_per_s, 2), "measured": rate.source}
    show(json.dumps(result) if args.json else f"{answer.to_text()}\nhost rate: {rate.rows_per_s:.1f} rows/s "
         f"({rate.source})")
    return 0


def _expert_bytes(args: argparse.Namespace, load: ExpertLoad) -> int:
    """--expert-bytes, or one expert's parameters in --dtype; the model must match the load's shape."""
    if args.model is None:
        return int(args.expert_bytes)
    config = ModelConfig.from_json(args.model / "config.json")
    shape = (config.num_hidden_layers, config.num_local_experts)
    if shape != (load.num_layers, load.num_experts):
        raise LoadFileError(f"{args.load} has {load.num_layers} layers x {load.num_experts} experts; "
                            f"{args.model} has {shape[0]} x {shape[1]}")
    return config.expert_num_params * DTYPES[args.dtype].itemsize
