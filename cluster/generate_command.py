"""`moe-cluster generate`: one completion, in this process or from a running server (--server)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from cluster.arguments import EXIT_FAILURE, EXIT_USAGE, UsageError, positive_int, read_token, token_ids
from cluster.backend_flags import add_cluster_flags, load_model
from cluster.client import ClientConfig, build_request
from cluster.client import generate as client_generate
from cluster.deploy import build_engine
from mixtral.config import DTYPES
from router.engine import Completion, EngineConfig
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams
from router.tokenizer import ChatMessage, Tokenizer, load_tokenizer


def add_generate_command(commands: argparse._SubParsersAction[Any]) -> None:
    p = commands.add_parser("generate", help="generate from a prompt, in this process or on a server")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="model directory (config.json + safetensors): run here")
    where.add_argument("--server", metavar="HOST:PORT", help="ask a running `moe-cluster serve` instead")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--token-ids", type=token_ids, help="prompt token ids, comma-separated")
    source.add_argument("--chat", type=Path, metavar="FILE.json",
                        help='chat messages: [{"role": "user", "content": "..."}, ...]')
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop-token-ids", type=token_ids, default=(), help="comma-separated")
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
    add_cluster_flags(p)
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos)
    if args.server is not None:
        return _generate_remote(args, params)
    if args.stop:
        raise UsageError("moe-cluster generate: --stop needs --server (the local run stops on token ids)")
    start = time.perf_counter()
    model, cluster = load_model(args, args.model)
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
    token = read_token(args.auth_token_file) if args.auth_token_file else None
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
