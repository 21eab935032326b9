"""Rotary position embeddings, HF Llama's rotate-half convention (so weights export as they are).

Positions are passed explicitly: the sink cache re-applies RoPE at *cache* positions
(StreamingLLM's position shift), so keys are stored unrotated and rotated when used.
"""
from __future__ import annotations

import math

import torch


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), i < d/2 (same as transformers' default rope init)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def scaled_rope_frequencies(cfg) -> torch.Tensor:
    """The frequencies an AttentionConfig asks for, with its `rope_scaling` applied as
    transformers' `linear` and `llama3` rope types compute them (neither rescales cos/sin)."""
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta)
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "none":
        return inv_freq
    if cfg.rope_scaling == "linear":
        return inv_freq / factor
    # llama3: wavelengths longer than the pretraining context / low_freq_factor are stretched by
    # `factor`, shorter than context / high_freq_factor kept, and the band between blended.
    low, high, context = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_context
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, stretched)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sign-folded sin, each (T, head_dim), for integer positions of shape (T,).

    HF writes the rotation as x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1].
    That equals x * cos + roll(x, d/2) * [-sin, sin]: one fused multiply-add instead of a
    chunk, a negation and a concatenation per call (RoPE runs twice per layer).
    """
    freqs = torch.outer(positions.to(inv_freq.device, torch.float32), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, sign: int = 1) -> torch.Tensor:
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin, value=sign)


class _Rotate(torch.autograd.Function):
    """The rotation with its transpose as the backward: one roll, one mul and one addcmul each way,
    where autograd would differentiate mul, roll and addcmul apart (1.5x faster fwd+bwd on the CPU).
    The transpose rotates by -angle; roll(signed_sin) = -signed_sin, so it is the same call with value -1."""

    @staticmethod
    def forward(ctx, x, cos, signed_sin):
        ctx.save_for_backward(cos, signed_sin)
        return _rotate(x, cos, signed_sin)

    @staticmethod
    def backward(ctx, grad):
        cos, signed_sin = ctx.saved_tensors
        return _rotate(grad, cos, signed_sin, sign=-1), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by (cos, signed_sin) from `rope_cos_sin`, each (T, D)."""
    if torch.is_grad_enabled() and x.requires_grad and not (cos.requires_grad or signed_sin.requires_grad):
        return _Rotate.apply(x, cos, signed_sin)
    return _rotate(x, cos, signed_sin)
