"""Rotary position embeddings, HF Llama's rotate-half convention (so weights export as they are).

Positions are passed explicitly: the sink cache re-applies RoPE at *cache* positions
(StreamingLLM's position shift), so keys are stored unrotated and rotated when used.
"""
from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), i < d/2 (same as transformers' default rope init)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sign-folded sin, each (T, head_dim), for integer positions of shape (T,).

    HF writes the rotation as x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1].
    That equals x * cos + roll(x, d/2) * [-sin, sin]: one fused multiply-add instead of a
    chunk, a negation and a concatenation per call (RoPE runs twice per layer).
    """
    freqs = torch.outer(positions.to(inv_freq.device, torch.float32), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by (cos, signed_sin) from `rope_cos_sin`, each (T, D)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
