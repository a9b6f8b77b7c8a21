"""Test helpers for the public API: a real server on a loopback port, and its clients.

`start_server` runs `cluster.serve.serve` (the code `moe-cluster serve` runs) in a background thread with
its own event loop, on port 0 and without a metrics endpoint; signals are not installed off the main
thread, so the handle's `stop()` ends it through `Served.stop`, exactly as SIGTERM would. Use it for
most tests (about half a second to start). `ServeProcess` is the real `moe-cluster serve` process, for
the tests where the process itself matters (SIGTERM, exit code).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from torch import Tensor

from cluster.deploy import (
    ClusterConfig,
    ExpertCluster,
    ExpertsWrapper,
    LocalConfig,
    build_engine,
    load_cluster_model,
    load_local_model,
)
from cluster.placement import HostResources
from cluster.serve import ServeConfig, Served, serve
from mixtral.block import Experts, PendingExperts
from mixtral.config import ModelConfig
from mixtral.model import Mixtral
from protos import router_pb2, router_pb2_grpc
from router.api import ServerConfig, merge_response
from router.engine import EngineConfig
from router.expert_load import CountingExperts
from router.kv_cache import CacheConfig, KVCache
from router.sampler import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from router.tokenizer import Tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


def load_counted_model(model_dir: Path, wrap: ExpertsWrapper | None = None, device: str = "cpu"
                       ) -> tuple[Mixtral, CountingExperts]:
    """The whole model in this process (float32, on `device`), its experts wrapped in a CountingExperts
    (outermost) around `wrap(experts)` if given."""
    wrapper, counting = _counted(model_dir, wrap)
    loaded = load_local_model(LocalConfig(model_dir, dtype="float32", device=device), wrapper)
    return loaded, counting[0]


def _counted(model_dir: Path, wrap: ExpertsWrapper | None) -> tuple[ExpertsWrapper, list[CountingExperts]]:
    """A wrapper putting a CountingExperts around `wrap(experts)`, and the list it appends that counter to."""
    config = ModelConfig.from_json(model_dir / "config.json")
    counting: list[CountingExperts] = []

    def wrapper(experts: Experts) -> Experts:
        inner = wrap(experts) if wrap is not None else experts
        counting.append(CountingExperts(inner, config.num_hidden_layers, config.num_local_experts))
        return counting[0]

    return wrapper, counting


class SlowExperts:
    """An expert backend that sleeps `delay_s` before each layer's experts and counts engine steps (calls
    of layer 0): steps long enough to act in the middle of a stream, and a clock counted in steps."""

    def __init__(self, inner: Experts, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.steps = 0

    def __call__(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        self._tick(layer)
        return self.inner(layer, hidden, expert_ids, weights)

    def submit(self, layer: int, hidden: Tensor, expert_ids: Tensor, weights: Tensor) -> PendingExperts:
        self._tick(layer)
        return self.inner.submit(layer, hidden, expert_ids, weights)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def _tick(self, layer: int) -> None:
        if layer == 0:
            self.steps += 1
        time.sleep(self.delay_s)


def model_info(model: Mixtral, cfg: ServeConfig, tokenizer: Tokenizer, backend: str = "local",
               num_hosts: int = 0, replicas: int = 0) -> router_pb2.ModelInfoResponse:
    c = model.config
    return router_pb2.ModelInfoResponse(
        model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_experts=c.num_local_experts, num_experts_per_token=c.num_experts_per_tok,
        dtype=str(model.dtype).removeprefix("torch."), backend=backend, num_hosts=num_hosts, replicas=replicas,
        max_prompt_tokens=cfg.server.limits.max_prompt_tokens, max_new_tokens=cfg.server.limits.max_new_tokens_cap,
        max_running=cfg.cache.num_slots, max_queue=cfg.scheduler.max_queue, tokenizer=tokenizer.name)


@dataclass
class ServerHandle:
    """A server running `cluster.serve.serve` in a thread of this process."""

    port: int
    served: Served
    model: Mixtral
    counting: CountingExperts
    tokenizer: Tokenizer
    cfg: ServeConfig
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)
    _channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheduler(self) -> Scheduler:
        return self.served.scheduler

    @property
    def cache(self) -> KVCache:
        return self.served.scheduler.engine.cache

    def channel(self) -> grpc.Channel:
        """A new insecure channel to the server, closed by stop()."""
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return channel

    def secure_channel(self, credentials: grpc.ChannelCredentials, target: str | None = None) -> grpc.Channel:
        """A new TLS channel to the server (at `target`, e.g. "localhost:PORT", if given), closed by stop()."""
        channel = grpc.secure_channel(target or self.address, credentials)
        self._channels.append(channel)
        return channel

    def stub(self) -> router_pb2_grpc.GenerationStub:
        return router_pb2_grpc.GenerationStub(self.channel())

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Set Served.stop (what SIGTERM does) from this thread, wait for the drain; re-raise serve()'s error."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.served.stop.set)
            self.thread.join(timeout)
            assert not self.thread.is_alive(), f"the server did not stop within {timeout:.0f} s"
        if self.errors:
            raise self.errors[0]

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request waits or runs and every cache slot is free (AssertionError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return
            time.sleep(0.01)
        raise AssertionError(f"not idle after {timeout:.0f} s: waiting={self.scheduler.num_waiting} "
                             f"running={self.scheduler.num_running} engine={len(self.scheduler.engine.running)} "
                             f"free slots={self.cache.num_free}")

    def idle(self) -> bool:
        s = self.scheduler
        return (s.num_waiting == 0 and s.num_running == 0 and not s.engine.running
                and self.cache.num_free == self.cfg.cache.num_slots)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(model_dir: Path | None = None, *, server: ServerConfig | None = None,
                 scheduler: SchedulerConfig | None = None, cache: CacheConfig | None = None,
                 engine: EngineConfig | None = None, grace_s: float = 10.0,
                 model: tuple[Mixtral, CountingExperts] | None = None, wrap: ExpertsWrapper | None = None,
                 is_healthy: Callable[[], bool] = lambda: True, info: dict[str, Any] | None = None,
                 cluster: Any = None, warm_up: bool | None = None) -> ServerHandle:
    """Start `serve()` on 127.0.0.1, port 0, no metrics endpoint; returns once it is listening.

    `model`: an already loaded (model, counting) pair (the cluster backend); else `model_dir` is loaded
    here with the local backend (float32, CPU), experts wrapped in `wrap` then a CountingExperts.
    `cluster`: what Admin.GetPlacement and Rebalance act on (an ExpertCluster, or a stand-in with its
    `placement` and `rebalance`); None: they answer as on the local backend.
    """
    if model is None:
        assert model_dir is not None, "give model_dir or model"
        model = load_counted_model(model_dir, wrap)
    loaded, counting = model
    tokenizer = load_tokenizer(model_dir, loaded.config.vocab_size)
    server_cfg = dataclasses.replace(server or ServerConfig(), host="127.0.0.1", port=0)
    cfg = ServeConfig(server=server_cfg, scheduler=scheduler or SchedulerConfig(), engine=engine or EngineConfig(),
                      cache=cache or CacheConfig(num_slots=8, max_seq_len=512), metrics_port=None, grace_s=grace_s,
                      warm_up=warm_up)
    response = model_info(loaded, cfg, tokenizer, **(info or {}))
    ready = threading.Event()
    state: dict[str, Any] = {}
    errors: list[BaseException] = []

    def on_ready(served: Served) -> None:
        state["served"] = served
        state["loop"] = asyncio.get_running_loop()
        ready.set()

    def run() -> None:
        try:
            asyncio.run(serve(loaded, counting, tokenizer, cfg, response, is_healthy, on_ready, cluster))
        except BaseException as err:  # handed to the test through stop() / the start timeout
            errors.append(err)
            ready.set()

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    if not ready.wait(START_TIMEOUT_S) or errors:
        raise AssertionError(f"the server did not start within {START_TIMEOUT_S:.0f} s: {errors!r}")
    served: Served = state["served"]
    return ServerHandle(served.public.port, served, loaded, counting, tokenizer, cfg, state["loop"], thread, errors)


@contextmanager
def serve_on_cluster(model_dir: Path, name: str, replicas: int, num_slots: int,
                     wrap: ExpertsWrapper | None = None) -> Iterator[tuple[ServerHandle, ExpertCluster]]:
    """`serve()` on a loopback port over 2 expert hosts (1 CPU each, float32) on the session's Ray cluster;
    the experts counted by a CountingExperts around `wrap(experts)`. Stops both at the end."""
    counted, counting = _counted(model_dir, wrap)
    cfg = ClusterConfig(model_dir, num_hosts=2, replicas=replicas, dtype="float32", device="cpu",
                        hosts=HostResources(num_cpus=1), name=f"{name}-{uuid.uuid4().hex[:8]}")
    model, cluster = load_cluster_model(cfg, counted)
    with cluster:
        srv = start_server(model=(model, counting[0]), is_healthy=cluster.is_serving,
                           cache=CacheConfig(num_slots=num_slots, max_seq_len=128),
                           info=dict(backend="cluster", num_hosts=2, replicas=replicas))
        try:
            yield srv, cluster
        finally:
            srv.stop()


def generated_alone(model_dir: Path, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens generated on its own, every expert in this process (float32)."""
    model = load_local_model(LocalConfig(model_dir, dtype="float32", device="cpu"))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [build_engine(model, CacheConfig(num_slots=1, max_seq_len=len(p) + new_tokens), EngineConfig())
            .generate([p], [params])[0].token_ids for p in prompts]


# --- the real `moe-cluster serve` process ----------------------------------------------------------

READY_LINE = re.compile(r"moe-cluster: serving (\S+) on (\S+):(\d+)")


class ServeProcess:
    """`python -m cluster.cli serve ARGS`, started and read until its "serving NAME on HOST:PORT" line."""

    def __init__(self, args: Sequence[object], env: dict[str, str] | None = None,
                 timeout: float = START_TIMEOUT_S) -> None:
        self.argv = [sys.executable, "-m", "cluster.cli", "serve", *map(str, args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._ready = threading.Event()
        self.host = ""
        self.port = 0
        self.name = ""
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True)]
        for reader in self._readers:
            reader.start()
        if not self._ready.wait(timeout) or not self.port:
            self.kill()
            raise AssertionError(f"`moe-cluster serve` did not print its ready line within {timeout:.0f} s "
                                 f"(exit code {self.proc.poll()}); stderr:\n{''.join(self.stderr)}")

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)
            match = READY_LINE.search(line)
            if match and not self._ready.is_set():
                self.name, self.host, self.port = match.group(1), match.group(2), int(match.group(3))
                self._ready.set()
        self._ready.set()  # the process ended without the line

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def terminate(self) -> None:
        """SIGTERM, as an orchestrator stops a container."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --- clients ---------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Until `condition()` holds (AssertionError naming `what` after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.005)


def request(prompt: str | Sequence[int] | None = None, *, chat: Iterable[tuple[str, str]] | None = None,
            max_new_tokens: int | None = 8, temperature: float | None = 0.0, top_p: float | None = None,
            top_k: int | None = None, seed: int | None = None, stop: Sequence[str] = (),
            stop_token_ids: Sequence[int] = (), logprobs: bool = True, ignore_eos: bool = True,
            request_id: str = "") -> router_pb2.GenerateRequest:
    """A GenerateRequest: text (str), token ids (a sequence of ints) or chat (role, content) pairs."""
    req = router_pb2.GenerateRequest(stop=list(stop), stop_token_ids=list(stop_token_ids), return_logprobs=logprobs,
                                     ignore_eos=ignore_eos, request_id=request_id)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    if chat is not None:
        req.chat.messages.extend(router_pb2.ChatMessage(role=r, content=c) for r, c in chat)
    if max_new_tokens is not None:
        req.max_new_tokens = max_new_tokens
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(req.sampling, name, value)
    return req


def merge(parts: Iterable[router_pb2.GenerateResponse]) -> router_pb2.GenerateResponse:
    """The whole completion from a stream's messages (what Generate answers at once)."""
    whole = router_pb2.GenerateResponse()
    for part in parts:
        merge_response(whole, part)
    return whole


def stream_parts(stub: router_pb2_grpc.GenerationStub, req: router_pb2.GenerateRequest, timeout: float = 60.0,
                 metadata: Sequence[tuple[str, str]] | None = None) -> list[router_pb2.GenerateResponse]:
    """Every message of a GenerateStream call."""
    return list(stub.GenerateStream(req, timeout=timeout, metadata=metadata))


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """The RpcError `call` raises (AssertionError if it returns)."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)  # type: ignore[call-overload]
    except grpc.RpcError as err:
        return err
    raise AssertionError(f"expected an RpcError, got {result!r}")
