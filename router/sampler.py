"""Token selection: greedy, temperature, top-k, top-p, with a per-sequence seeded generator.

Shapes: R rows (sequences sampling this step), V vocabulary. Each row draws one uniform number
from its own generator per token, so a seeded sequence samples the same tokens whatever else is
in the batch. The reported log-probability is that of the chosen token under the model itself
(log-softmax of the raw logits, before temperature or truncation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int | None = None  # keep the k most likely tokens; None: all
    seed: int | None = None  # None: a fresh random seed
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # keep generating past the model's end-of-sequence token

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be at least 1 (or unset)")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def new_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
           ) -> tuple[list[int], list[float]]:
    """Logits [R, V] (float32) -> chosen token and its log-probability per row."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [R, V]
    chosen = logits.argmax(dim=-1)  # [R]
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if random_rows:
        rows = torch.tensor(random_rows)
        picked = _sample_rows(logits.index_select(0, rows), [params[i] for i in random_rows],
                              [generators[i] for i in random_rows])
        chosen[rows] = picked
    token_logprobs = logprobs.gather(1, chosen[:, None]).squeeze(1)
    return chosen.tolist(), token_logprobs.tolist()


def _sample_rows(logits: Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator]) -> Tensor:
    """Inverse-CDF sampling over each row's truncated, tempered distribution: [R, V] -> [R]."""
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
    sorted_logits, sorted_ids = torch.sort(logits / temperature, dim=-1, descending=True)  # [R, V]
    rank = torch.arange(logits.shape[-1])[None, :]
    top_k = torch.tensor([p.top_k or logits.shape[-1] for p in params])[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype)[:, None]
    # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
    probs = probs.masked_fill(torch.cumsum(probs, dim=-1) - probs >= top_p, 0.0)
    cdf = torch.cumsum(probs, dim=-1)
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    targets = (uniform.to(cdf.dtype) * cdf[:, -1])[:, None]  # [R, 1]
    index = torch.searchsorted(cdf, targets, right=True).clamp_(max=logits.shape[-1] - 1)
    index = torch.minimum(index, (probs > 0).sum(dim=-1, keepdim=True) - 1)
    return sorted_ids.gather(1, index).squeeze(1)
