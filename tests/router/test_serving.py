"""The public API (moe.v1) over real servers on loopback ports, local backend, the tiny checkpoint in float32.

Most tests share one module server (`server`, in conftest.py); tests that need other limits, slow steps, a broken
engine or a process of their own start their own. "Alone" means the same request served with nothing
else running: greedy results served concurrently must be identical to it (the batch never changes a
result).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.deploy import LocalConfig, build_engine, load_local_model
from protos import router_pb2, router_pb2_grpc
from router.engine import EngineConfig
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams
from tests.router.served import (
    FINISH,
    SLOTS,
    assert_same_completion,
    check_stream_shape,
)
from tests.serving import (
    ServerHandle,
    merge,
    request,
    stream_parts,
)

# --- 32 concurrent clients ---------------------------------------------------------------------------

TEXTS = ["The experts of a mixture", "Bonjour, comment ça va ?", "東京 and Kyoto 🙂", "def f(x): return x * 2",
         "Once upon a time", "1, 2, 3, 4,"]


def concurrent_requests() -> list[router_pb2.GenerateRequest]:
    """32 requests: text, chat and token-id prompts of 2-30 tokens, 4-20 new tokens, greedy (even i)
    and seeded sampling with various temperature / top_p / top_k (odd i)."""
    reqs = []
    for i in range(32):
        text = TEXTS[i % len(TEXTS)] + " word" * (i % 5)
        sampled = i % 2 == 1
        kw: dict[str, Any] = dict(max_new_tokens=4 + (i * 7) % 17, ignore_eos=not sampled or i % 4 == 1)
        if sampled:
            kw.update(temperature=(0.6, 0.9, 1.3, 2.5)[i % 4], top_p=(1.0, 0.9, 0.7)[i % 3],
                      top_k=(None, 40)[(i // 2) % 2], seed=1000 + i)
        if i % 3 == 0:
            reqs.append(request(text, **kw))
        elif i % 3 == 1:
            chat = [("system", "Be brief.")] if i % 2 else []
            reqs.append(request(chat=[*chat, ("user", text)], **kw))
        else:
            reqs.append(request([1, *range(100 + 37 * i, 100 + 37 * i + 1 + i % 11)], **kw))
    return reqs


def prompt_ids(stub: router_pb2_grpc.GenerationStub, req: router_pb2.GenerateRequest) -> list[int]:
    kind = req.WhichOneof("prompt")
    if kind == "token_ids":
        return list(req.token_ids.ids)
    tokenize = router_pb2.TokenizeRequest(text=req.text) if kind == "text" else router_pb2.TokenizeRequest(chat=req.chat)
    return list(stub.Tokenize(tokenize).token_ids)


def transformers_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: list[int]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # every token, as ignore_eos does
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p, n in zip(prompts, new_tokens)]


@pytest.mark.slow
def test_32_concurrent_streams_equal_each_request_alone_and_transformers(server: ServerHandle,
                                                                         tiny_checkpoint: Path) -> None:
    reqs = concurrent_requests()
    stub = server.stub()
    alone = [stub.Generate(r, timeout=60) for r in reqs]

    barrier = threading.Barrier(len(reqs))
    streams: list[list[router_pb2.GenerateResponse] | BaseException] = [[] for _ in reqs]
    peak = [0]
    done = threading.Event()

    def client(i: int) -> None:
        own = server.stub()  # one channel per client, as separate processes would have
        barrier.wait()
        try:
            streams[i] = stream_parts(own, reqs[i], timeout=60)
        except BaseException as err:  # reported below, with the request
            streams[i] = err

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.scheduler.num_running)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    watcher.join()

    assert peak[0] == SLOTS, f"the requests never filled the batch (peak {peak[0]} running)"
    for i, (req, parts, want) in enumerate(zip(reqs, streams, alone)):
        assert not isinstance(parts, BaseException), f"request {i}: {parts!r}"
        whole = check_stream_shape(parts, server.tokenizer)
        assert whole.usage.prompt_tokens == len(prompt_ids(stub, req)) == want.usage.prompt_tokens
        if req.ignore_eos:
            assert whole.finish_reason == FINISH.FINISH_REASON_LENGTH and len(whole.token_ids) == req.max_new_tokens
        if req.sampling.temperature == 0:
            assert_same_completion(whole, want, f"greedy request {i}")
        # Seeded sampling's batch invariance is checked at the engine level below (test_seeded_sampling_...).

    greedy = [i for i, r in enumerate(reqs) if r.sampling.temperature == 0]
    assert len(greedy) == 16
    expected = transformers_greedy(tiny_checkpoint, [prompt_ids(stub, reqs[i]) for i in greedy],
                                   [reqs[i].max_new_tokens for i in greedy])
    for i, tokens in zip(greedy, expected):
        assert list(alone[i].token_ids) == tokens, f"greedy request {i} differs from transformers"


@pytest.mark.slow
def test_seeded_sampling_does_not_depend_on_the_batch(tiny_checkpoint: Path) -> None:
    # Deterministic (the engine alone, fixed batches): 48 seeded requests, 24 tokens each, in batches of 8
    # versus one at a time. Served concurrently, the same happens to the sampled requests of the 32 clients.
    model = load_local_model(LocalConfig(tiny_checkpoint, dtype="float32", device="cpu"))
    g = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, 32000, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()]
               for _ in range(48)]
    params = [SamplingParams(max_new_tokens=24, temperature=(0.7, 1.0, 1.5)[i % 3], top_p=(1.0, 0.9)[i % 2],
                             seed=i, ignore_eos=True) for i in range(48)]
    alone = [build_engine(model, CacheConfig(num_slots=1, max_seq_len=64), EngineConfig()).generate([p], [sp])[0]
             for p, sp in zip(prompts, params)]
    batched = [c for start in range(0, 48, 8)
               for c in build_engine(model, CacheConfig(num_slots=8, max_seq_len=64), EngineConfig()).generate(
                   prompts[start:start + 8], params[start:start + 8])]
    differ = [i for i in range(48) if alone[i].token_ids != batched[i].token_ids]
    assert not differ, f"{len(differ)} of 48 seeded requests sample other tokens in a batch of 8: {differ}"


def test_seeded_sampling_repeats_and_the_seed_matters(server: ServerHandle) -> None:
    stub = server.stub()
    req = request([1, 330, 2033, 349], max_new_tokens=12, temperature=1.5, seed=7)
    first, second = stub.Generate(req), stub.Generate(req)
    req.sampling.seed = 8
    other = stub.Generate(req)
    assert list(first.token_ids) == list(second.token_ids)
    assert list(first.token_ids) != list(other.token_ids)


# --- text: deltas, multi-byte characters, stop strings ----------------------------------------------


def boundaries(tokenizer: Any, ids: list[int]) -> list[int]:
    """Character offsets of the text at each token boundary (decode of each prefix)."""
    return [len(tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]


@pytest.fixture(scope="module")
def base(server: ServerHandle) -> router_pb2.GenerateResponse:
    """A greedy 24-token completion without stop strings, the reference of the stop tests."""
    answer = server.stub().Generate(request([1, 415, 5565, 302, 4843], max_new_tokens=24))
    assert answer.finish_reason == FINISH.FINISH_REASON_LENGTH and len(answer.text) > 40
    return answer


def with_stop(stop: list[str], max_new_tokens: int = 24) -> router_pb2.GenerateRequest:
    return request([1, 415, 5565, 302, 4843], max_new_tokens=max_new_tokens, stop=stop)


def test_stop_string_across_a_token_boundary_cuts_the_text_and_finishes_with_stop(server: ServerHandle,
                                                                                 base: router_pb2.GenerateResponse
                                                                                 ) -> None:
    ids, text = list(base.token_ids), base.text
    bounds = boundaries(server.tokenizer, ids)
    # A stop string of 2 characters either side of a boundary in the middle, at its first occurrence.
    at = next(b for b in bounds[len(ids) // 3:] if 2 <= b <= len(text) - 2 and text.find(text[b - 2:b + 2]) == b - 2)
    stop = text[at - 2:at + 2]
    cut = text[:at - 2]
    # The token that completes the stop string is the last one generated.
    completes = next(k for k in range(1, len(ids) + 1) if stop in server.tokenizer.decode(ids[:k]))
    stub = server.stub()
    unary = stub.Generate(with_stop([stop, "never appears \u2603"]))
    parts = stream_parts(stub, with_stop([stop, "never appears \u2603"]))
    streamed = merge(parts)
    for got in (unary, streamed):
        assert got.text == cut
        assert got.finish_reason == FINISH.FINISH_REASON_STOP
        assert list(got.token_ids) == ids[:completes]
        assert got.usage.completion_tokens == completes
    released = ""
    for part in parts:  # nothing after or inside the stop string is ever streamed
        released += part.text
        assert cut.startswith(released)


def test_the_earliest_of_several_stop_strings_wins(server: ServerHandle, base: router_pb2.GenerateResponse) -> None:
    text = base.text
    early, late = text[12:15], text[30:34]
    got = server.stub().Generate(with_stop([late, early]))
    assert got.text == text[:min(text.find(early), text.find(late))]
    assert len(got.text) <= 12 and got.finish_reason == FINISH.FINISH_REASON_STOP


def test_a_stop_string_that_never_appears_changes_nothing(server: ServerHandle,
                                                          base: router_pb2.GenerateResponse) -> None:
    got = server.stub().Generate(with_stop(["\u2603 not in the text"]))
    assert_same_completion(got, base, "unused stop string")


def test_a_stop_string_completed_by_the_last_token_finishes_with_stop(server: ServerHandle,
                                                                     base: router_pb2.GenerateResponse) -> None:
    ids = list(base.token_ids)
    bounds = boundaries(server.tokenizer, ids)
    end = bounds[-1]
    stop = base.text[end - 3:end]
    assert stop in base.text[bounds[-2] - 1:] and base.text.find(stop) == end - 3
    got = server.stub().Generate(with_stop([stop]))
    assert got.text == base.text[:end - 3]
    assert got.finish_reason == FINISH.FINISH_REASON_STOP


def test_stop_token_ids_end_after_the_token(server: ServerHandle, base: router_pb2.GenerateResponse) -> None:
    ids = list(base.token_ids)
    stop_id = ids[7]
    first = ids.index(stop_id)
    req = with_stop([])
    req.stop_token_ids.append(stop_id)
    got = server.stub().Generate(req)
    assert list(got.token_ids) == ids[:first + 1]
    assert got.finish_reason == FINISH.FINISH_REASON_STOP
    assert got.text == server.tokenizer.decode(ids[:first + 1])
