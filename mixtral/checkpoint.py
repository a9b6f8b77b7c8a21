"""Safetensors checkpoints in the Hugging Face layout: names, shapes, and lazy partial loads.

The only module that opens weight files. A checkpoint is one `model.safetensors` or shards listed
by `model.safetensors.index.json`. Loads are by name and memory-mapped, so an expert host reads
only its own (layer, expert) tensors: ~336 MiB per Mixtral-8x7B expert in bf16, not 90 GiB.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mixtral.config import ModelConfig

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Our expert weight names -> the checkpoint's, per model type. Mistral's dense MLP is expert 0.
_EXPERT_NAMES = {
    "mixtral": {
        "w1": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
        "w2": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
        "w3": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
    },
    "mistral": {
        "w1": "model.layers.{layer}.mlp.gate_proj.weight",
        "w2": "model.layers.{layer}.mlp.down_proj.weight",
        "w3": "model.layers.{layer}.mlp.up_proj.weight",
    },
}
_LAYER_NAMES = {
    "input_norm": "model.layers.{layer}.input_layernorm.weight",
    "post_attention_norm": "model.layers.{layer}.post_attention_layernorm.weight",
    "wq": "model.layers.{layer}.self_attn.q_proj.weight",
    "wk": "model.layers.{layer}.self_attn.k_proj.weight",
    "wv": "model.layers.{layer}.self_attn.v_proj.weight",
    "wo": "model.layers.{layer}.self_attn.o_proj.weight",
    "gate": "model.layers.{layer}.block_sparse_moe.gate.weight",  # Mixtral only
}
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


class CheckpointError(ValueError):
    """A weight file is missing, truncated or corrupt, or a tensor is absent or has the wrong shape."""


def expert_tensor_names(config: ModelConfig, layer: int, expert: int) -> dict[str, str]:
    """{"w1": name, "w2": name, "w3": name} of one expert in the checkpoint."""
    table = _EXPERT_NAMES[config.model_type]
    return {key: name.format(layer=layer, expert=expert) for key, name in table.items()}


def layer_tensor_names(config: ModelConfig, layer: int) -> dict[str, str]:
    """Attention, norm and (for Mixtral) gate weights of one decoder layer."""
    names = {key: name.format(layer=layer) for key, name in _LAYER_NAMES.items()}
    if not config.is_moe:
        del names["gate"]
    return names


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the model reads -> its shape (nn.Linear layout: [out, in])."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {EMBED: (v, d), FINAL_NORM: (d,)}
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (v, d)
    for layer in range(config.num_hidden_layers):
        names = layer_tensor_names(config, layer)
        shapes[names["input_norm"]] = (d,)
        shapes[names["post_attention_norm"]] = (d,)
        shapes[names["wq"]] = (config.q_size, d)
        shapes[names["wk"]] = (config.kv_size, d)
        shapes[names["wv"]] = (config.kv_size, d)
        shapes[names["wo"]] = (d, config.q_size)
        if config.is_moe:
            shapes[names["gate"]] = (config.num_local_experts, d)
        for expert in range(config.num_local_experts):
            w = expert_tensor_names(config, layer, expert)
            shapes[w["w1"]], shapes[w["w2"]], shapes[w["w3"]] = (f, d), (d, f), (f, d)
    return shapes


class Checkpoint:
    """Name -> file map of a model directory's safetensors; loads named subsets lazily."""

    def __init__(self, model_dir: Path, config: ModelConfig) -> None:
        self.model_dir = Path(model_dir)
        self.config = config
        self.file_of = _locate_tensors(self.model_dir)
        self._shapes = expected_shapes(config)

    def __contains__(self, name: str) -> bool:
        """Whether the checkpoint holds a tensor of this name."""
        return name in self.file_of

    def load(self, names: Iterable[str], dtype: torch.dtype, device: str | torch.device = "cpu", copy: bool = True
             ) -> dict[str, torch.Tensor]:
        """Read the named tensors (memory-mapped), check their shapes, convert to `dtype`.

        With copy=False a tensor already in `dtype` on the CPU may be a view of the mapped file: for
        callers that build their own copy at once (and so avoid copying twice).
        """
        wanted = list(names)
        for name in wanted:
            if name not in self.file_of:
                raise CheckpointError(f"{self.model_dir}: tensor {name} is missing from the checkpoint")
        tensors: dict[str, torch.Tensor] = {}
        for file, group in _group_by_file(wanted, self.file_of):
            tensors.update(self._read(file, group, dtype, device, copy))
        return tensors

    def _read(self, file: str, names: list[str], dtype: torch.dtype, device: str | torch.device, copy: bool
              ) -> Iterator[tuple[str, torch.Tensor]]:
        path = self.model_dir / file
        for name, tensor in _read_file(path, names):
            self._check_shape(path, name, tensor)
            # copy=True: never keep a view of the memory-mapped file (it would pin file pages in memory
            # beside the copy, and break if the file is rewritten while we serve).
            yield name, tensor.to(device=device, dtype=dtype, copy=copy)

    def _check_shape(self, path: Path, name: str, tensor: torch.Tensor) -> None:
        want = self._shapes.get(name)
        if want is not None and tuple(tensor.shape) != want:
            raise CheckpointError(f"{path}: tensor {name} has shape {list(tensor.shape)}, "
                                  f"config.json implies {list(want)}")


def _read_file(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Memory-mapped reads of `names` from one safetensors file; read failures name the file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            present = set(handle.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{path}: tensor {name} is listed in the index but "
                                          "absent from the file")
                tensor = handle.get_tensor(name)
                yield name, tensor
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot read tensors ({err}); the file is truncated or "
                              "corrupt: copy it again") from None


def _locate_tensors(model_dir: Path) -> dict[str, str]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err!r})") from None
        for file in sorted(set(weight_map.values())):
            if not (model_dir / file).is_file():
                raise CheckpointError(f"{model_dir / file}: shard listed in {INDEX_FILE} is missing")
        return dict(weight_map)
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")
    try:
        with safe_open(str(single), framework="pt") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{single}: cannot read the safetensors header ({err}); the file is "
                              "truncated or corrupt") from None


def _group_by_file(names: list[str], file_of: dict[str, str]) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(file_of[name], []).append(name)
    return sorted(groups.items())


def write_checkpoint(model_dir: Path, tensors: dict[str, torch.Tensor],
                     shard_bytes: int | None = None) -> None:
    """Write tensors in the Hugging Face layout: one model.safetensors, or shards of at most
    `shard_bytes` each (a tensor larger than that gets a shard of its own) plus the index."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in [model_dir / SINGLE_FILE, model_dir / INDEX_FILE, *model_dir.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # an old index would otherwise win over the new weights
    shards = _split_into_shards(tensors, shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(model_dir / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(model_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _split_into_shards(tensors: dict[str, torch.Tensor], shard_bytes: int | None
                       ) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard_bytes is not None and shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    return shards
