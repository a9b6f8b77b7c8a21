"""The Mixtral/Mistral causal LM on a ragged batch: embeddings, decoder layers, final norm, LM head.

Shapes: T tokens in the step, D hidden, V vocabulary, R rows whose logits are wanted.
The model holds weights only: the KV cache arrives per call, the experts through `Experts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mixtral.attention import AttentionMetadata
from mixtral.block import DecoderLayer, Experts, LayerWeights, rms_norm
from mixtral.checkpoint import EMBED, FINAL_NORM, LM_HEAD, Checkpoint, layer_tensor_names
from mixtral.config import ModelConfig
from mixtral.linear import Projection
from mixtral.rope import rope_cos_sin, rope_inv_freq


class Mixtral:
    """Everything of the model except the experts' weights (those sit behind `experts`)."""

    def __init__(self, config: ModelConfig, embed: Tensor, layers: Sequence[LayerWeights],
                 final_norm: Tensor, lm_head: Tensor, experts: Experts) -> None:
        self.config = config
        self.embed = embed  # [V, D]
        self.layers = [DecoderLayer(config, i, w, experts) for i, w in enumerate(layers)]
        self.final_norm = final_norm  # [D]
        self.lm_head = Projection.of(lm_head)  # [V, D]; a re-laid copy of the embedding when tied
        self.inv_freq = rope_inv_freq(config.head_size, config.rope_theta).to(embed.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @classmethod
    def load(cls, checkpoint: Checkpoint, dtype: torch.dtype, device: str | torch.device,
             experts: Experts) -> Mixtral:
        """Read the non-expert tensors of `checkpoint` (experts are loaded by their hosts)."""
        config = checkpoint.config
        names = [EMBED, FINAL_NORM] + ([] if config.tie_word_embeddings else [LM_HEAD])
        per_layer = [layer_tensor_names(config, i) for i in range(config.num_hidden_layers)]
        names += [name for layer in per_layer for name in layer.values()]
        tensors = checkpoint.load(names, dtype, device)
        layers = [_layer_weights(tensors, layer) for layer in per_layer]
        lm_head = tensors[EMBED] if config.tie_word_embeddings else tensors[LM_HEAD]
        return cls(config, tensors[EMBED], layers, tensors[FINAL_NORM], lm_head, experts)

    def forward(self, token_ids: Tensor, meta: AttentionMetadata, kv: Sequence[tuple[Tensor, Tensor]],
                logit_rows: Tensor) -> Tensor:
        """Run one step: token ids [T] -> logits [R, V] (float32) of the rows `logit_rows` [R].

        `kv[layer]` is that layer's (k_cache, v_cache), each [S, Hkv, C, Dh]; the step's keys and
        values are stored into them.
        """
        x = F.embedding(token_ids, self.embed)  # [T, D]
        cos, sin = rope_cos_sin(meta.positions, self.inv_freq, self.dtype)  # [T, Dh] each
        for layer, (k_cache, v_cache) in zip(self.layers, kv, strict=True):
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return self.logits(x, logit_rows)

    def logits(self, x: Tensor, rows: Tensor) -> Tensor:
        """Final norm and LM head on the rows [R] of hidden states [T, D] -> [R, V] float32."""
        x = rms_norm(x.index_select(0, rows), self.final_norm, self.config.rms_norm_eps)  # [R, D]
        return self.lm_head(x).float()


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """One of the two halves of an overlapped step: its tokens [T], metadata and logit rows [R]."""

    token_ids: Tensor
    meta: AttentionMetadata
    logit_rows: Tensor


def forward_overlapped(model: Mixtral, a: MicroBatch, b: MicroBatch, kv: Sequence[tuple[Tensor, Tensor]]
                       ) -> tuple[Tensor, Tensor]:
    """Two micro-batches in ping-pong: while one's experts run (elsewhere), the other's attention runs here.

    Per layer: attention of A, submit A's experts; finish B's previous layer; attention of B, submit
    B's experts; finish A's. Returns the logits of A [Ra, V] and of B [Rb, V], float32. Each result
    equals `model.forward` on that micro-batch alone.
    """
    xa, xb = F.embedding(a.token_ids, model.embed), F.embedding(b.token_ids, model.embed)
    rope_a = rope_cos_sin(a.meta.positions, model.inv_freq, model.dtype)
    rope_b = rope_cos_sin(b.meta.positions, model.inv_freq, model.dtype)
    pending_b = None
    for layer, (k_cache, v_cache) in zip(model.layers, kv, strict=True):
        xa, pending_a = layer.submit(xa, *rope_a, k_cache, v_cache, a.meta)
        if pending_b is not None:
            xb = xb + pending_b.result()
        xb, pending_b = layer.submit(xb, *rope_b, k_cache, v_cache, b.meta)
        xa = xa + pending_a.result()
    assert pending_b is not None
    xb = xb + pending_b.result()
    return model.logits(xa, a.logit_rows), model.logits(xb, b.logit_rows)


def _layer_weights(tensors: dict[str, Tensor], names: dict[str, str]) -> LayerWeights:
    wqkv = torch.cat([tensors[names[key]] for key in ("wq", "wk", "wv")], dim=0)
    return LayerWeights(
        input_norm=tensors[names["input_norm"]],
        post_attention_norm=tensors[names["post_attention_norm"]],
        wqkv=Projection.of(wqkv.contiguous()),
        wo=Projection.of(tensors[names["wo"]]),
        gate=Projection.of(tensors[names["gate"]]) if "gate" in names else None,
    )
