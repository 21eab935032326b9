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
    """cos, sin of shape (T, head_dim) for integer positions of shape (T,)."""
    freqs = torch.outer(positions.to(inv_freq.device, torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D)."""
    return x * cos + rotate_half(x) * sin
