"""Shared by the moe.v1 API tests (test_serving*.py): the module server's limits, tolerances and checks."""

from __future__ import annotations

from typing import Any

import grpc
import torch

from protos import router_pb2
from router.api import ApiLimits
from tests.serving import (
    merge,
)

LIMITS = ApiLimits(max_prompt_tokens=64, max_new_tokens_cap=64, default_max_new_tokens=16)
SLOTS = 8
MAX_MESSAGE_BYTES = 64 * 1024
# Logprobs near -10 (a flat random model) have a float32 spacing of about 1e-6, and a batch sums in another
# order than a lone request: measured differences reach 1.5e-5 over 24 tokens, 4e-5 over 200.
LOGPROB_ATOL, LOGPROB_RTOL = 1e-5, 2e-6
FINISH = router_pb2.FinishReason
CODE = grpc.StatusCode


def assert_logprobs_close(got: list[float], want: list[float], what: str = "", long: bool = False) -> None:
    scale = 4 if long else 1  # 200+ tokens: the differences grow with the KV cache
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=scale * LOGPROB_ATOL,
                               rtol=scale * LOGPROB_RTOL, msg=lambda m: f"{what}: {m}")


def assert_same_completion(got: router_pb2.GenerateResponse, want: router_pb2.GenerateResponse, what: str) -> None:
    assert list(got.token_ids) == list(want.token_ids), what
    assert_logprobs_close(list(got.logprobs), list(want.logprobs), what)
    assert got.text == want.text, what
    assert got.finish_reason == want.finish_reason, what
    assert got.usage == want.usage, what


def check_stream_shape(parts: list[router_pb2.GenerateResponse], tokenizer: Any) -> router_pb2.GenerateResponse:
    """A stream is one message per token, then a final one with finish reason and usage; its text deltas
    concatenate to the decoded tokens (so any U+FFFD is one the whole text has at that place), and no
    delta before the last ends in U+FFFD, the mark of a character whose bytes are still arriving."""
    assert parts, "an empty stream"
    *steps, last = parts
    assert all(len(p.token_ids) == 1 and not p.finish_reason for p in steps)
    assert not last.token_ids and last.finish_reason != FINISH.FINISH_REASON_UNSPECIFIED
    whole = merge(parts)
    assert last.usage.completion_tokens == len(whole.token_ids)
    assert whole.text == tokenizer.decode(list(whole.token_ids))
    assert not any(p.text.endswith("\ufffd") for p in steps)
    return whole
