"""The `moe-cluster` command line. The only place that reads the environment or prints.

User errors (bad flags, a broken checkpoint, an unsupported config, a bad request) end with one
line on stderr and exit code 2; prompts and completions are never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import grpc
import torch

from cluster.admin_commands import add_admin_commands
from cluster.client import ClientConfig, build_request
from cluster.client import generate as client_generate
from cluster.controller import HostResources
from cluster.demo import SIZES, write_demo_model
from cluster.deploy import (
    ClusterConfig,
    ClusterStartError,
    ExpertCluster,
    ExpertsWrapper,
    LocalConfig,
    build_engine,
    load_cluster_model,
    load_local_model,
)
from cluster.placement import PlacementError
from cluster.planning_commands import add_planning_commands
from cluster.scale_command import add_scale_command, run_scale
from cluster.scaler import ScaleError
from cluster.serve import ServeConfig, Served, serve
from mixtral.block import Experts
from mixtral.checkpoint import CheckpointError
from mixtral.config import DTYPES, ConfigError, ModelConfig
from mixtral.model import Mixtral
from protos import router_pb2
from router.api import ApiLimits, Guardrail, ServerConfig, TlsConfig
from router.dispatch import DispatchConfig, ExpertUnavailableError
from router.engine import Completion, EngineConfig, RequestError
from router.expert_load import CountingExperts
from router.kv_cache import CacheConfig, slots_within
from router.sampler import SamplingParams
from router.scheduler import SchedulerConfig
from router.tokenizer import ChatMessage, Tokenizer, TokenizerError, load_tokenizer

log = logging.getLogger("moe-cluster")

EXIT_USAGE = 2
EXIT_FAILURE = 1
USER_ERRORS = (ConfigError, CheckpointError, TokenizerError, RequestError, PlacementError, ValueError, OSError)
RUNTIME_ERRORS = (ClusterStartError, ExpertUnavailableError, ScaleError)


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> Parser:
    parser = Parser(prog="moe-cluster", description="Serve Mixtral-family MoE models on your own hardware.")
    parser.add_argument("--log-level", default=os.environ.get("MOE_LOG_LEVEL", "WARNING"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads for this process (default: every core)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_demo_model(commands)
    _add_generate(commands)
    _add_serve(commands)
    add_planning_commands(commands, show=print, note=lambda text: print(text, file=sys.stderr))
    add_admin_commands(commands, show=print, note=lambda text: print(text, file=sys.stderr))
    add_scale_command(commands, run=lambda args: run_scale(args, show=print))
    return parser


def _add_demo_model(commands: argparse._SubParsersAction[Parser]) -> None:
    p = commands.add_parser("demo-model", help="write a random-weight Mixtral checkpoint (HF layout)")
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="tiny: loads in a second; mini: the benchmark model (791M parameters)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--shard-size", type=_positive_int, default=None, metavar="BYTES",
                   help="split into safetensors shards of at most BYTES, with an index")
    p.set_defaults(run=run_demo_model)


def _add_generate(commands: argparse._SubParsersAction[Parser]) -> None:
    p = commands.add_parser("generate", help="generate from a prompt, in this process or on a server")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="model directory (config.json + safetensors): run here")
    where.add_argument("--server", metavar="HOST:PORT", help="ask a running `moe-cluster serve` instead")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--token-ids", type=_token_ids, help="prompt token ids, comma-separated")
    source.add_argument("--chat", type=Path, metavar="FILE.json",
                        help='chat messages: [{"role": "user", "content": "..."}, ...]')
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop-token-ids", type=_token_ids, default=(), help="comma-separated")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--tokenizer", default=None,
                   help="hf, mistral-v1, mistral-v3, ... (default: tokenizer.json, else by vocabulary)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--stop", action="append", default=[], help="stop string (--server only; repeatable)")
    client = p.add_argument_group("client of a server (--server)")
    client.add_argument("--stream", action="store_true", help="print text as it is generated")
    client.add_argument("--ca-cert", type=Path, default=None, help="CA (PEM) of the server's certificate: use TLS")
    client.add_argument("--client-cert", type=Path, default=None, help="client certificate (PEM) for mTLS")
    client.add_argument("--client-key", type=Path, default=None, help="client key (PEM) for mTLS")
    client.add_argument("--auth-token-file", type=Path, default=None, help="file holding the bearer token")
    client.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="deadline of the call")
    _add_cluster_flags(p)
    p.set_defaults(run=run_generate)


def _add_cluster_flags(p: Parser) -> None:
    group = p.add_argument_group("experts on a Ray cluster (--backend cluster)")
    group.add_argument("--backend", choices=["local", "cluster"], default="local",
                       help="local: every expert in this process; cluster: expert hosts as Ray actors over gRPC")
    group.add_argument("--hosts", type=_positive_int, default=2, help="expert hosts (round-robin plan)")
    group.add_argument("--replicas", type=_positive_int, default=1, help="hosts serving each expert")
    group.add_argument("--plan", type=Path, default=None, help="a placement plan JSON instead of round-robin")
    group.add_argument("--host-memory", type=_positive_int, default=None, metavar="BYTES",
                       help="refuse a plan that puts more expert weights than this on any host")
    group.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (default: start a local instance and stop it afterwards)")
    group.add_argument("--cpus-per-host", type=float, default=1.0, help="Ray CPUs (and torch threads) per host")
    group.add_argument("--gpus-per-host", type=float, default=0.0, help="Ray GPUs per host (fractions allowed)")
    group.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                       default="PACK", help="how the hosts' placement group spreads over nodes")
    group.add_argument("--max-restarts", type=int, default=3, help="Ray restarts of a failed host (-1: forever)")
    group.add_argument("--expert-tls", nargs=3, type=Path, default=None, metavar=("CERT", "KEY", "CA"),
                       help="mutual TLS between router and expert hosts: PEM cert, key and CA, at the same paths "
                       "on every node (the host certificate needs the DNS name moe-expert-host)")
    group.add_argument("--restart-wait", type=float, default=30.0, metavar="SECONDS",
                       help="how long a layer waits for a restarted host when no replica of an expert answers")


def _add_serve(commands: argparse._SubParsersAction[Parser]) -> None:
    p = commands.add_parser("serve", help="serve the public gRPC API (moe.v1, KServe v2, health, reflection)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model directory (config.json + safetensors)")
    source.add_argument("--demo", choices=sorted(SIZES), help="serve a demo checkpoint, built once into --demo-cache")
    p.add_argument("--demo-cache", type=Path, default=Path.home() / ".cache" / "moe-cluster",
                   help="where --demo checkpoints are built and reused")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=_port, default=50051, help="public gRPC port")
    p.add_argument("--metrics-port", type=_port, default=9090, help="Prometheus metrics over HTTP (0: off)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--device", default=None, help="the router's device: cpu, cuda or cuda:N")
    p.add_argument("--tokenizer", default=None, help="as for generate")
    security = p.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM); enables TLS")
    security.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    security.add_argument("--tls-client-ca", type=Path, default=None,
                          help="CA bundle (PEM): require client certificates signed by it (mTLS)")
    security.add_argument("--auth-token-file", type=Path, default=None,
                          help="require 'authorization: Bearer <token>' with the token in this file")
    security.add_argument("--log-content", action="store_true",
                          help="allow prompt and completion text in logs (off: never logged)")
    security.add_argument("--safe-prompt", action="store_true",
                          help="prepend the guardrail system prompt to every chat unless a request says otherwise")
    security.add_argument("--guardrail-prompt-file", type=Path, default=None,
                          help="the guardrail system prompt (default: Mistral's safe_prompt text)")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-queue", type=_positive_int, default=64,
                        help="waiting requests before RESOURCE_EXHAUSTED")
    limits.add_argument("--max-running", type=_positive_int, default=32, help="sequences generating at once")
    limits.add_argument("--max-prompt-tokens", type=_positive_int, default=4096, help="longer prompts: OUT_OF_RANGE")
    limits.add_argument("--max-new-tokens-cap", type=_positive_int, default=2048,
                        help="cap on a request's max_new_tokens")
    limits.add_argument("--kv-cache-memory", type=_positive_int, default=None, metavar="BYTES",
                        help="KV-cache budget: at most this many bytes of slots (each reserved for a whole "
                        "sequence of max-prompt-tokens + max-new-tokens-cap); lowers --max-running to fit")
    limits.add_argument("--max-batch-tokens", type=_positive_int, default=2048, help="new tokens per engine step")
    limits.add_argument("--max-message-bytes", type=_positive_int, default=16 * 2**20, help="gRPC message size limit")
    limits.add_argument("--grace-period", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long running requests may finish")
    _add_cluster_flags(p)
    p.set_defaults(run=run_serve)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _token_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def run_demo_model(args: argparse.Namespace) -> int:
    _build_demo(args.out, args.size, args.seed, args.shard_size)
    return 0


def _build_demo(out: Path, size: str, seed: int, shard_size: int | None) -> None:
    """Write a demo checkpoint, showing progress on stderr."""
    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            print(f"\rbuilding {size} demo model: {100 * done // total:3d}%", end="", file=sys.stderr)

    start = time.perf_counter()
    config = write_demo_model(out, size, seed, shard_size, progress)
    print(f"\nwrote {out} ({config.num_hidden_layers} layers, {config.num_local_experts} experts, "
          f"hidden {config.hidden_size}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos)
    if args.server is not None:
        return _generate_remote(args, params)
    if args.stop:
        raise UsageError("moe-cluster generate: --stop needs --server (the local run stops on token ids)")
    start = time.perf_counter()
    model, cluster = _load_model(args, args.model)
    try:
        tokenizer = load_tokenizer(args.model, model.config.vocab_size, args.tokenizer)
        prompt = _prompt_ids(args, tokenizer)
        cache = CacheConfig(num_slots=1, max_seq_len=max(2, len(prompt) + args.max_new_tokens))
        engine = build_engine(model, cache, EngineConfig())
        loaded = time.perf_counter()
        completion = engine.generate([prompt], [params])[0]
    finally:
        if cluster is not None:
            cluster.close()
    _report(args, completion, tokenizer, loaded - start, time.perf_counter() - loaded)
    return 0


def _generate_remote(args: argparse.Namespace, params: SamplingParams) -> int:
    token = _read_token(args.auth_token_file) if args.auth_token_file else None
    cfg = ClientConfig(args.server, args.ca_cert, args.client_cert, args.client_key, token, args.timeout)
    chat = _read_chat(args.chat) if args.chat is not None else None
    request = build_request(params, text=args.prompt, token_ids=args.token_ids, chat=chat, stop=args.stop)

    def show(text: str) -> None:
        print(text, end="", flush=True)

    try:
        result = client_generate(cfg, request, args.stream, None if args.json else show)
    except grpc.RpcError as err:
        code = err.code()
        print(f"moe-cluster: {code.name}: {err.details()}", file=sys.stderr)
        return EXIT_USAGE if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE) else EXIT_FAILURE
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif args.stream:
        print()
    else:
        print(result["text"])
    return 0


def _read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise UsageError(f"{path}: the token file is empty")
    return token


def run_serve(args: argparse.Namespace) -> int:
    model_dir = args.model if args.model is not None else _demo_dir(args.demo, args.demo_cache)
    model_config = ModelConfig.from_json(model_dir / "config.json")
    tokenizer = load_tokenizer(model_dir, model_config.vocab_size, args.tokenizer)
    counting: list[CountingExperts] = []

    def wrap(experts: Experts) -> Experts:
        counting.append(CountingExperts(experts, model_config.num_hidden_layers, model_config.num_local_experts))
        return counting[0]

    cfg = replace(_serve_config(args), model_name=model_dir.name)
    model, cluster = _load_model(args, model_dir, wrap)
    try:
        if args.kv_cache_memory is not None:
            slots = slots_within(model.config, cfg.cache.max_seq_len, model.dtype, args.kv_cache_memory)
            cfg = replace(cfg, cache=replace(cfg.cache, num_slots=min(cfg.cache.num_slots, slots)))
        info = _model_info(model, args, cfg, tokenizer)
        healthy = cluster.is_serving if cluster is not None else (lambda: True)

        def ready(served: Served) -> None:
            print(f"moe-cluster: serving {model_dir.name} on {args.host}:{served.public.port} "
                  f"(metrics on :{args.metrics_port})", flush=True)

        asyncio.run(serve(model, counting[0], tokenizer, cfg, info, healthy, ready, cluster))
    finally:
        if cluster is not None:
            cluster.close()
    return 0


def _serve_config(args: argparse.Namespace) -> ServeConfig:
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("moe-cluster serve: --tls-cert and --tls-key go together")
        tls = TlsConfig(args.tls_cert.read_bytes(), args.tls_key.read_bytes(),
                        args.tls_client_ca.read_bytes() if args.tls_client_ca else None)
    elif args.tls_client_ca:
        raise UsageError("moe-cluster serve: --tls-client-ca needs --tls-cert and --tls-key")
    token = _read_token(args.auth_token_file) if args.auth_token_file else None
    limits = ApiLimits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens_cap=args.max_new_tokens_cap)
    guardrail = Guardrail(default_on=args.safe_prompt)
    if args.guardrail_prompt_file is not None:
        guardrail = Guardrail(prompt=args.guardrail_prompt_file.read_text().strip(), default_on=args.safe_prompt)
    server = ServerConfig(host=args.host, port=args.port, max_message_bytes=args.max_message_bytes, tls=tls,
                          auth_token=token, limits=limits, guardrail=guardrail, log_content=args.log_content)
    max_seq_len = args.max_prompt_tokens + args.max_new_tokens_cap
    return ServeConfig(server=server, scheduler=SchedulerConfig(max_queue=args.max_queue),
                       engine=EngineConfig(max_batch_tokens=args.max_batch_tokens),
                       cache=CacheConfig(num_slots=args.max_running, max_seq_len=max_seq_len),
                       metrics_port=args.metrics_port or None, grace_s=args.grace_period)


def _model_info(model: Mixtral, args: argparse.Namespace, cfg: ServeConfig, tokenizer: Tokenizer
                ) -> router_pb2.ModelInfoResponse:
    c = model.config
    return router_pb2.ModelInfoResponse(
        model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_experts=c.num_local_experts, num_experts_per_token=c.num_experts_per_tok,
        dtype=str(model.dtype).removeprefix("torch."), backend=args.backend,
        num_hosts=args.hosts if args.backend == "cluster" else 0,
        replicas=args.replicas if args.backend == "cluster" else 0,
        max_prompt_tokens=cfg.server.limits.max_prompt_tokens, max_new_tokens=cfg.server.limits.max_new_tokens_cap,
        max_running=cfg.cache.num_slots, max_queue=cfg.scheduler.max_queue, tokenizer=tokenizer.name)


def _demo_dir(size: str, cache: Path) -> Path:
    """The demo checkpoint of `size`, built once into `cache` and reused."""
    out = cache / f"mixtral-{size}"
    if (out / ".complete").is_file():
        return out
    print(f"building the {size} demo checkpoint into {out} (once)", file=sys.stderr)
    _build_demo(out, size, seed=0, shard_size=None)
    (out / ".complete").write_text("ok\n")
    return out


def _load_model(args: argparse.Namespace, model_dir: Path, wrap: ExpertsWrapper | None = None
                ) -> tuple[Mixtral, ExpertCluster | None]:
    if args.backend == "local":
        return load_local_model(LocalConfig(model_dir, dtype=args.dtype, device=args.device), wrap), None
    hosts = HostResources(num_cpus=args.cpus_per_host, num_gpus=args.gpus_per_host,
                          strategy=args.placement_strategy, max_restarts=args.max_restarts)
    cfg = ClusterConfig(model_dir, num_hosts=args.hosts, replicas=args.replicas, plan_path=args.plan,
                        host_memory_bytes=args.host_memory, ray_address=args.ray_address, dtype=args.dtype,
                        device=args.device, hosts=hosts,
                        dispatch_tls=tuple(args.expert_tls) if args.expert_tls else None,
                        dispatch=DispatchConfig(restart_wait_s=args.restart_wait))
    return load_cluster_model(cfg, wrap)


def _prompt_ids(args: argparse.Namespace, tokenizer: Tokenizer) -> list[int]:
    if args.token_ids is not None:
        return list(args.token_ids)
    if args.prompt is not None:
        return tokenizer.encode(args.prompt)
    return tokenizer.encode_chat(_read_chat(args.chat))


def _read_chat(path: Path) -> list[ChatMessage]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"--chat {path}: cannot read JSON ({err})") from None
    if isinstance(raw, dict):
        raw = raw.get("messages")
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise UsageError(f"--chat {path}: expected a list of {{\"role\": ..., \"content\": ...}} objects")
    try:
        return [ChatMessage(role=str(m["role"]), content=str(m["content"])) for m in raw]
    except KeyError as err:
        raise UsageError(f"--chat {path}: a message lacks the field {err}") from None


def _report(args: argparse.Namespace, completion: Completion, tokenizer: Tokenizer,
            load_s: float, generate_s: float) -> None:
    text = tokenizer.decode(completion.token_ids)
    if args.json:
        print(json.dumps({
            "token_ids": completion.token_ids, "text": text, "logprobs": completion.logprobs,
            "finish_reason": completion.finish_reason,
            "usage": {"prompt_tokens": len(completion.prompt_token_ids),
                      "completion_tokens": len(completion.token_ids)},
            "timings": {"load_s": round(load_s, 4), "generate_s": round(generate_s, 4)},
        }, ensure_ascii=False))
    else:
        print(text)
    rate = len(completion.token_ids) / generate_s if generate_s > 0 else 0.0
    print(f"{len(completion.token_ids)} tokens in {generate_s:.2f} s ({rate:.1f} tok/s, "
          f"finish_reason={completion.finish_reason}); load {load_s:.2f} s", file=sys.stderr)


def _reexec_with_passive_openmp(args: argparse.Namespace) -> None:
    """Run a cluster-backend router with OpenMP threads that sleep while they wait.

    The router spends most of a step waiting for expert hosts; OpenMP's default busy-wait keeps its
    threads spinning on cores the hosts on the same machine need (on 2 cores it cost the cluster
    backend 40% of its decode speed in bench/dispatch.py). The policy is read when torch loads, so
    the command is started again with it set, unless the operator chose a policy.
    """
    if getattr(args, "backend", "local") == "cluster" and "OMP_WAIT_POLICY" not in os.environ:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, "-m", "cluster.cli", *sys.argv[1:]], env)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if argv is None:  # a real command line, not a call from Python
            _reexec_with_passive_openmp(args)
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return int(args.run(args))
    except UsageError as err:
        print(err, file=sys.stderr)
    except USER_ERRORS as err:
        print(f"moe-cluster: error: {err}", file=sys.stderr)
    except RUNTIME_ERRORS as err:
        print(f"moe-cluster: failed: {err}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
