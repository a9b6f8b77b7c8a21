"""`moe-cluster serve`: the public gRPC API over the local or the cluster backend, until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cluster.arguments import UsageError, port, positive_float, positive_int, read_token
from cluster.backend_flags import add_cluster_flags, load_model
from cluster.demo import SIZES
from cluster.demo_command import demo_dir
from cluster.serve import ServeConfig, Served, serve
from mixtral.block import Experts
from mixtral.config import DTYPES, ModelConfig
from mixtral.model import Mixtral
from protos import router_pb2
from router.api import ApiLimits, Guardrail, ServerConfig, TlsConfig
from router.engine import EngineConfig
from router.expert_load import CountingExperts
from router.kv_cache import CacheConfig, slots_within
from router.scheduler import SchedulerConfig
from router.tokenizer import Tokenizer, load_tokenizer


def add_serve_command(commands: argparse._SubParsersAction[Any]) -> None:
    p = commands.add_parser("serve", help="serve the public gRPC API (moe.v1, KServe v2, health, reflection)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model directory (config.json + safetensors)")
    source.add_argument("--demo", choices=sorted(SIZES), help="serve a demo checkpoint, built once into --demo-cache")
    p.add_argument("--demo-cache", type=Path, default=Path.home() / ".cache" / "moe-cluster",
                   help="where --demo checkpoints are built and reused")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=port, default=50051, help="public gRPC port")
    p.add_argument("--metrics-port", type=port, default=9090, help="Prometheus metrics over HTTP (0: off)")
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
    limits.add_argument("--max-queue", type=positive_int, default=64,
                        help="waiting requests before RESOURCE_EXHAUSTED")
    limits.add_argument("--max-running", type=positive_int, default=32, help="sequences generating at once")
    limits.add_argument("--max-prompt-tokens", type=positive_int, default=4096, help="longer prompts: OUT_OF_RANGE")
    limits.add_argument("--max-new-tokens-cap", type=positive_int, default=2048,
                        help="cap on a request's max_new_tokens")
    limits.add_argument("--kv-cache-memory", type=positive_int, default=None, metavar="BYTES",
                        help="KV-cache budget: at most this many bytes of slots (each reserved for a whole "
                        "sequence of max-prompt-tokens + max-new-tokens-cap); lowers --max-running to fit")
    limits.add_argument("--max-batch-tokens", type=positive_int, default=2048, help="new tokens per engine step")
    limits.add_argument("--max-message-bytes", type=positive_int, default=16 * 2**20, help="gRPC message size limit")
    limits.add_argument("--grace-period", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long running requests may finish")
    connections = p.add_argument_group("connections")
    connections.add_argument("--client-ping-interval", type=positive_float, default=10.0, metavar="SECONDS",
                             help="clients may ping a connection without data this often (gRPC's default, 300 s, "
                             "closes the connections of clients that ping faster)")
    connections.add_argument("--keepalive", type=positive_float, default=60.0, metavar="SECONDS",
                             help="ping a client's connection after this long without traffic")
    connections.add_argument("--keepalive-timeout", type=positive_float, default=20.0, metavar="SECONDS",
                             help="close a connection whose ping has no answer within this, cancelling its requests")
    add_cluster_flags(p)
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    model_dir = args.model if args.model is not None else demo_dir(args.demo, args.demo_cache)
    model_config = ModelConfig.from_json(model_dir / "config.json")
    tokenizer = load_tokenizer(model_dir, model_config.vocab_size, args.tokenizer)
    counting: list[CountingExperts] = []

    def wrap(experts: Experts) -> Experts:
        counting.append(CountingExperts(experts, model_config.num_hidden_layers, model_config.num_local_experts))
        return counting[0]

    cfg = replace(_serve_config(args), model_name=model_dir.name)
    # Only the engine thread runs parallel torch ops (see SchedulerConfig.engine_threads): this thread
    # loads the model and allocates the KV cache on one thread, and hands the pool's size to the engine.
    cfg = replace(cfg, scheduler=replace(cfg.scheduler, engine_threads=torch.get_num_threads()))
    torch.set_num_threads(1)
    model, cluster = load_model(args, model_dir, wrap)
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
    token = read_token(args.auth_token_file) if args.auth_token_file else None
    limits = ApiLimits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens_cap=args.max_new_tokens_cap)
    guardrail = Guardrail(default_on=args.safe_prompt)
    if args.guardrail_prompt_file is not None:
        guardrail = Guardrail(prompt=args.guardrail_prompt_file.read_text().strip(), default_on=args.safe_prompt)
    server = ServerConfig(host=args.host, port=args.port, max_message_bytes=args.max_message_bytes, tls=tls,
                          auth_token=token, limits=limits, guardrail=guardrail, log_content=args.log_content,
                          client_ping_interval_s=args.client_ping_interval, keepalive_s=args.keepalive,
                          keepalive_timeout_s=args.keepalive_timeout)
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
