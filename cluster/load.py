"""Expert load: rows the gate routes to each (layer, expert), measured offline or exported live.

A load file is JSON:

    {"layers": L, "experts": E, "load": [[rows of expert 0..E-1] for layer 0..L-1],
     "window_s": seconds the rows were gathered over (offline: the run's wall time; live: the
                 exact length of the router's window, see router.expert_load.LoadWindow),
     "tokens": token positions through every layer,
     "experts_per_token": K, "source": "offline" | "live" (`load --server`) | ...}

A row is one (token, k) slot of the top-K gate, exactly what router.expert_load.CountingExperts
counts, so sum(load[l]) == tokens * K in every layer. "window_s", "tokens" and "experts_per_token"
may be null where unknown; more fields may be added.

Offline measurement (`measure_load`) runs the serving code itself in this process: the same model,
engine and gate, with CountingExperts around the in-process experts. Each prompt is prefilled and,
with max_new_tokens > 1, decoded greedily (ignoring EOS) for max_new_tokens - 1 more steps; the
default of 1 counts the prompt tokens only. A live server sent the same prompts with the same
(greedy, ignore_eos, max_new_tokens) requests counts the same rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.deploy import LocalConfig, build_engine, load_local_model
from mixtral.block import Experts
from mixtral.config import ModelConfig
from mixtral.model import Mixtral
from router.engine import EngineConfig
from router.expert_load import CountingExperts
from router.kv_cache import CacheConfig
from router.sampler import SamplingParams
from router.tokenizer import ChatMessage, Tokenizer, load_tokenizer


class LoadFileError(ValueError):
    """A load or prompt file that cannot be used, with the file and the problem."""


@dataclass(frozen=True, slots=True)
class ExpertLoad:
    """Rows routed to each (layer, expert) over a measurement window."""

    rows: tuple[tuple[float, ...], ...]  # [layer][expert]; counts, written as integers when they are
    window_s: float | None = None
    tokens: int | None = None  # token positions that went through every layer
    experts_per_token: int | None = None  # the gate's top-K
    source: str = "offline"

    def __post_init__(self) -> None:
        if not self.rows or not self.rows[0]:
            raise LoadFileError("a load needs at least one layer and one expert")
        if any(len(r) != len(self.rows[0]) for r in self.rows):
            raise LoadFileError("every layer of a load needs the same number of experts")
        if any(v < 0 for r in self.rows for v in r):
            raise LoadFileError("row counts must not be negative")

    @property
    def num_layers(self) -> int:
        return len(self.rows)

    @property
    def num_experts(self) -> int:
        return len(self.rows[0])

    def token_count(self) -> float:
        """Token positions behind the rows: `tokens`, else rows / (L * K); LoadFileError if unknown."""
        if self.tokens:
            return float(self.tokens)
        if self.experts_per_token:
            return sum(map(sum, self.rows)) / (self.num_layers * self.experts_per_token)
        raise LoadFileError("the load file gives neither tokens nor experts_per_token")

    def rows_per_token(self) -> float:
        """Rows one token adds to one layer: the gate's K (when every layer saw every token)."""
        return sum(map(sum, self.rows)) / (self.num_layers * self.token_count())

    def to_json(self) -> str:
        return json.dumps({"layers": self.num_layers, "experts": self.num_experts, "load": self.rows,
                           "window_s": self.window_s, "tokens": self.tokens,
                           "experts_per_token": self.experts_per_token, "source": self.source})

    @classmethod
    def from_json(cls, text: str) -> ExpertLoad:
        try:
            raw: Any = json.loads(text)
            rows = tuple(tuple(_count(v) for v in layer) for layer in raw["load"])
            load = cls(rows, _optional(raw.get("window_s"), float), _optional(raw.get("tokens"), int),
                       _optional(raw.get("experts_per_token"), int), str(raw.get("source", "unknown")))
            declared = (int(raw["layers"]), int(raw["experts"]))
        except (ValueError, KeyError, TypeError) as err:
            raise LoadFileError(f"not a load file: {err!r}") from None
        if declared != (load.num_layers, load.num_experts):
            raise LoadFileError(f"declares {declared[0]} layers x {declared[1]} experts but its load is "
                                f"{load.num_layers} x {load.num_experts}")
        return load

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def read(cls, path: Path) -> ExpertLoad:
        try:
            return cls.from_json(path.read_text())
        except LoadFileError as err:
            raise LoadFileError(f"{path}: {err}") from None


def _count(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"row count {value!r} is not a number")
    return value


def _optional(value: Any, kind: type[int] | type[float]) -> Any:
    return None if value is None else kind(value)


def zipf_load(num_layers: int, num_experts: int, tokens: int = 4096, s: float = 1.2, top_k: int = 2) -> ExpertLoad:
    """A synthetic load for demos and tests: in layer l, expert (l + r) % E has rank r + 1 and gets
    rows in proportion to 1 / (r + 1)^s, so each layer has a different hot expert; each layer's rows
    sum to tokens * top_k exactly (largest remainders round up).

    Example: 2 experts, s = 1, 3 tokens, top-1 -> layer 0: [2, 1], layer 1: [1, 2].
    """
    weights = [(r + 1) ** -s for r in range(num_experts)]
    total = tokens * top_k
    exact = [total * w / sum(weights) for w in weights]
    by_rank = [int(x) for x in exact]
    for r in sorted(range(num_experts), key=lambda r: (by_rank[r] - exact[r], r))[:total - sum(by_rank)]:
        by_rank[r] += 1
    rows = tuple(tuple(by_rank[(e - layer) % num_experts] for e in range(num_experts)) for layer in range(num_layers))
    return ExpertLoad(rows, None, tokens, top_k, f"zipf s={s}")


@dataclass(frozen=True, slots=True)
class Prompt:
    """One line of a prompt file."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_new_tokens: int | None = None  # None: the measurement's default

    def encode(self, tokenizer: Tokenizer) -> list[int]:
        if self.token_ids is not None:
            return list(self.token_ids)
        if self.messages is not None:
            return tokenizer.encode_chat(self.messages)
        return tokenizer.encode(self.text or "")


def read_prompts(path: Path) -> list[Prompt]:
    """A JSONL file: one {"prompt": text} | {"token_ids": [...]} | {"messages": [{"role", "content"}]}
    per line, each with an optional "max_new_tokens"; blank lines are skipped."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                prompts.append(_prompt(json.loads(line)))
            except (ValueError, KeyError, TypeError) as err:
                raise LoadFileError(f"{path}:{number}: {err}") from None
    if not prompts:
        raise LoadFileError(f"{path}: no prompts")
    return prompts


def _prompt(raw: Any) -> Prompt:
    if not isinstance(raw, dict) or len({"prompt", "token_ids", "messages"} & raw.keys()) != 1:
        raise ValueError('each line needs exactly one of "prompt", "token_ids" or "messages"')
    limit = raw.get("max_new_tokens")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_new_tokens={limit!r} must be a positive integer")
    if "token_ids" in raw:
        return Prompt(token_ids=tuple(int(t) for t in raw["token_ids"]), max_new_tokens=limit)
    if "messages" in raw:
        chat = tuple(ChatMessage(role=str(m["role"]), content=str(m["content"])) for m in raw["messages"])
        return Prompt(messages=chat, max_new_tokens=limit)
    return Prompt(text=str(raw["prompt"]), max_new_tokens=limit)


@dataclass(frozen=True, slots=True)
class MeasureConfig:
    """How the offline measurement runs the model."""

    model: LocalConfig
    max_new_tokens: int = 1  # per prompt, unless its line says otherwise; 1: prompt tokens only
    batch_size: int = 8  # prompts run together through the engine
    tokenizer: str | None = None  # as `generate --tokenizer`
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")


def measure_load(prompts: list[Prompt], cfg: MeasureConfig) -> ExpertLoad:
    """Run `prompts` through the model of `cfg` in this process and count rows per (layer, expert)."""
    config = ModelConfig.from_json(cfg.model.model_dir / "config.json")
    counter: list[CountingExperts] = []

    def wrap(experts: Experts) -> Experts:
        counter.append(CountingExperts(experts, config.num_hidden_layers, config.num_local_experts))
        return counter[0]

    model = load_local_model(cfg.model, wrap)
    tokenizer = load_tokenizer(cfg.model.model_dir, config.vocab_size, cfg.tokenizer)
    encoded = [(p.encode(tokenizer), p.max_new_tokens or cfg.max_new_tokens) for p in prompts]
    start = time.perf_counter()
    for i in range(0, len(encoded), cfg.batch_size):
        _generate(model, encoded[i:i + cfg.batch_size], cfg.engine)
    window = time.perf_counter() - start
    return load_from_counter(counter[0], config.num_experts_per_tok, window, "offline")


def load_from_counter(counter: CountingExperts, top_k: int, window_s: float | None, source: str) -> ExpertLoad:
    """The rows a CountingExperts has seen, as a load; the same conversion serves a live export.

    tokens = layer 0's rows / top_k: the gate gives every token exactly top_k experts.
    """
    rows = counter.rows.tolist()  # [L, E]
    window = None if window_s is None else round(window_s, 4)
    return ExpertLoad(tuple(tuple(int(v) for v in layer) for layer in rows), window, sum(rows[0]) // top_k,
                      top_k, source)


def _generate(model: Mixtral, batch: list[tuple[list[int], int]], engine_cfg: EngineConfig) -> None:
    """Greedy, EOS ignored, so the rows counted depend on the prompts and lengths alone."""
    longest = max(len(ids) + n for ids, n in batch)
    engine = build_engine(model, CacheConfig(num_slots=len(batch), max_seq_len=max(2, longest)), engine_cfg)
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for _, n in batch]
    engine.generate([ids for ids, _ in batch], params)
