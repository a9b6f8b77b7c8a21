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

from mixtral import cpu_kernels

MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE): greedy
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
        # Below MIN_TEMPERATURE, logits / temperature overflows; the limit of such sampling is greedy.
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


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
    if logits.device.type != "cpu":
        return _sample_on_device(logits, params, generators)
    found = cpu_kernels.greedy(logits)  # greedy tokens and log-normalisers in one call, where the kernels run
    if found is None:
        logprobs = torch.log_softmax(logits, dim=-1)  # [R, V]
        chosen = logits.argmax(dim=-1)  # [R]
    else:
        chosen, top, log_norm = found
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if random_rows:
        rows = torch.tensor(random_rows)
        picked = _sample_rows(logits.index_select(0, rows), [params[i] for i in random_rows],
                              [generators[i] for i in random_rows])
        chosen[rows] = picked
    if found is None:
        token_logprobs = logprobs.gather(1, chosen[:, None]).squeeze(1)
    else:
        token_logprobs = logits.gather(1, chosen[:, None]).squeeze(1) - top - log_norm
    return chosen.tolist(), token_logprobs.tolist()


def _sample_on_device(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
                      ) -> tuple[list[int], list[float]]:
    """`sample` of logits on a GPU: each row's greedy token and log-probability are found there, so 2R numbers
    come back to the host instead of R x V logits. Only rows that sample at random are copied back whole, to
    draw from their generators (on the host, so a seed gives the same tokens on any device)."""
    top, chosen = logits.max(dim=-1)  # [R]
    logprob = -torch.logsumexp(logits - top[:, None], dim=-1)  # the chosen token's logit is the top
    found = torch.stack((chosen.double(), logprob.double())).cpu()  # one copy back; ids are exact in float64
    token_ids, logprobs = [int(t) for t in found[0].tolist()], found[1].tolist()
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if random_rows:
        rows = logits[random_rows].cpu()  # [r, V]
        picked = _sample_rows(rows, [params[i] for i in random_rows], [generators[i] for i in random_rows])
        picked_logprobs = torch.log_softmax(rows, dim=-1).gather(1, picked[:, None]).squeeze(1)
        for i, token, logprob_i in zip(random_rows, picked.tolist(), picked_logprobs.tolist(), strict=True):
            token_ids[i], logprobs[i] = token, logprob_i
    return token_ids, logprobs


def _sample_rows(logits: Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator]) -> Tensor:
    """Sample each row's truncated, tempered distribution: [R, V] -> [R] token ids.

    The draw is an exponential race: token = argmax(p / q) with q ~ Exp(1) drawn per vocabulary
    entry from the row's generator, which picks token i with probability p_i. Each token's noise is
    tied to its id, so logits that differ in the last bits (a sequence batched with others, or
    alone) pick the same token unless two tokens' races are tied that closely, which inverse-CDF
    sampling over 32000 near-equal probabilities would not guarantee.
    """
    vocab = logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
    sorted_logits, sorted_ids = torch.sort(logits / temperature, dim=-1, descending=True)  # [R, V]
    rank = torch.arange(vocab)[None, :]
    top_k = torch.tensor([p.top_k or vocab for p in params])[:, None]
    sorted_probs = torch.softmax(sorted_logits.masked_fill(rank >= top_k, float("-inf")), dim=-1)
    top_p = torch.tensor([p.top_p for p in params], dtype=sorted_probs.dtype)[:, None]
    # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
    sorted_probs = sorted_probs.masked_fill(torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p, 0.0)
    sorted_probs[:, 0] = sorted_probs[:, 0].nan_to_num(1.0)  # a degenerate row falls back to its best token
    probs = torch.zeros_like(sorted_probs).scatter_(1, sorted_ids, sorted_probs.nan_to_num(0.0))  # vocab order
    noise = torch.stack([torch.empty(vocab, dtype=probs.dtype).exponential_(generator=g) for g in generators])
    return (probs / noise).argmax(dim=-1)
