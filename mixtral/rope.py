"""Rotary position embeddings, computed as Hugging Face Mixtral/Mistral do (half-split rotation).

Shapes: T tokens, H heads, Dh head size.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_inv_freq(head_size: int, theta: float) -> Tensor:
    """Inverse frequencies [Dh / 2], float32."""
    exponents = torch.arange(0, head_size, 2, dtype=torch.float32) / head_size
    return 1.0 / (theta**exponents)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Absolute positions [T] -> cos, sin [T, Dh] in `dtype` (angles computed in float32)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]  # [T, Dh/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys [T, H, Dh] by their positions' angles (cos, sin [T, Dh])."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
