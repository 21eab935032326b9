"""The attention block shared by the decoder (causal) and the ViT (bidirectional).

Projections, optional QK-norm, RoPE, the attention itself (score functions: model/scores.py; the
kernel that runs them: model/backends/, resolved once when the block is built or moved), and the
optional output gate (Qiu et al. 2025, position G1), which multiplies each head's output by
sigmoid(x W_g) before o_proj. `sink_logit: learned` adds `sinks`, one logit per head (gpt-oss), and
`sink_value` adds `sink_values`, the slot's value per KV head: a key-value slot with no position that
every query attends to and no cache evicts. With a cache (model/cache.py) the block stores its new keys and
values there and attends over what the cache returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import backends
from .backends.base import needs_backward
from .config import AttentionConfig, block_option
from .norm import RMSNorm
from .rope import apply_rope, rope_cos_sin, scaled_rope_frequencies
from .scores import add_slot_value, expand_kv, linear_attention_chunked, math_attention, weights_from_scores


@dataclass
class AttentionWeights:
    """What `return_attn` gives per layer.

    probs: (B, H, Tq, Tk) row-normalised weights. For kinds without row normalisation this is
           Gu et al.'s proxy w / sum_j(w), so sink metrics mean the same thing for every kind
           (softpick: a row of zero mass, every score <= 0, stays 0).
    mass:  (B, H, Tq) raw row mass sum_j(w) actually applied to the values (1 for softmax,
           linear and the normalised variants).
    sink_slot: (B, H, Tq) the weight of sink_logit's virtual key, exp(b_h) / (exp(b_h) + sum_j exp(s_ij))
           = 1 - mass; None without a sink logit.
    """

    probs: torch.Tensor
    mass: torch.Tensor
    sink_slot: torch.Tensor | None = None


class Attention(nn.Module):
    """Multi-head attention with RoPE, optional QK-norm, pluggable scores and output gate.

    `backend` is the resolved backend name (cfg.backend, or what `auto` picks for the device and
    dtype of the weights); `set_backend` pins the dtype the block will compute in (bf16 under
    mixed precision)."""

    def __init__(self, cfg: AttentionConfig, causal: bool = True):
        super().__init__()
        cfg.validate()
        backends.check_construction(cfg)  # a missing package fails here, not at the first step
        self.cfg, self.causal = cfg, causal
        H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.n_embd, Hkv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.n_embd, Hkv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, cfg.n_embd, bias=block_option(cfg, "o_proj_bias"))  # ViT imports only
        if cfg.gate != "none":
            self.g_proj = nn.Linear(cfg.n_embd, H if cfg.gate == "headwise" else H * D, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(D, eps=cfg.norm_eps)
        if cfg.sink_logit == "learned":  # initialised at sink_logit_init (0.0: softmax + 1 until training moves it)
            self.sinks = nn.Parameter(torch.full((H,), float(cfg.sink_logit_init)))
        if cfg.sink_value:  # zero: the slot adds nothing but its share of the denominator until fitted or trained
            self.sink_values = nn.Parameter(torch.zeros(Hkv, D))
        # A plain attribute, not a buffer: module casts (bf16 under DeepSpeed) must not round it.
        self.inv_freq = scaled_rope_frequencies(cfg)
        self.compute_dtype = None  # None: the weights' dtype
        self._resolve_backend()

    # ---------------------------------------------------------------- which kernel runs
    def set_backend(self, device=None, dtype: torch.dtype | None = None) -> str:
        """Resolve the backend for `device` (default: the weights') and compute `dtype` (kept
        across later moves); returns its description."""
        self.compute_dtype = dtype
        return self._resolve_backend(device)

    def _resolve_backend(self, device=None) -> str:
        weight = self.q_proj.weight
        device, dtype = device or weight.device, self.compute_dtype or weight.dtype
        self.backend = backends.resolve(self.cfg, device, dtype)
        self.kernel = backends.get(self.backend)
        self.refusals = {}  # (device, dtype, needs backward) -> why_not's answer (None: it runs), asked once each
        self.backend_description = backends.describe(self.cfg, device, dtype)
        return self.backend_description

    def _apply(self, fn, recurse: bool = True):
        """.to() / .cuda() / .bfloat16() move or cast the weights: resolve `auto` again for them."""
        out = super()._apply(fn, recurse)
        self._resolve_backend()
        return out

    # ---------------------------------------------------------------- forward
    def rope_table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and signed sin (model/rope.py) of positions 0..n-1. The decoder computes it once per
        forward and hands it to every layer, which slices the positions it rotates."""
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return rope_cos_sin(torch.arange(n, device=device), self.inv_freq, torch.float32)

    def rope(self, x: torch.Tensor, start: int, table=None) -> torch.Tensor:
        """Rotate x (B,H,T,D) as if it sat at positions start .. start+T-1: rows of `table` (a
        rope_table covering them), or computed here without one."""
        if table is None:
            return self.rope_at(x, torch.arange(start, start + x.shape[-2], device=x.device))
        if not self.cfg.rope:
            return x
        cos, sin = table
        T = x.shape[-2]
        return apply_rope(x, cos[start : start + T].to(x.dtype), sin[start : start + T].to(x.dtype))

    def rope_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B,H,T,D) at integer positions (T,)."""
        if not self.cfg.rope:
            return x
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        return apply_rope(x, cos, sin)

    def forward(self, x: torch.Tensor, cache=None, return_attn: bool = False, rope=None):
        """x: (B, T, n_embd) normed input. cache: this layer's store (model/cache.py) or None.
        rope: a rope_table covering every position this call rotates (the cached keys' too); None:
        made here, as when the block is used on its own.

        Returns (y, AttentionWeights or None); with a cache, no weights.
        """
        cfg = self.cfg
        B, T, _ = x.shape
        if cfg.rope and rope is None and not (cache is not None and cache.is_band):  # the band form rotates its own
            rope = self.rope_table(T + (len(cache) if cache is not None else 0), x.device)
        H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)

        weights = None
        if cache is None:
            y, weights = self.attend(self.rope(q, 0, rope), self.rope(k, 0, rope), v, return_attn)
        elif cache.is_recurrent:
            y = self.attend_recurrent(q, k, v, cache, rope)
        elif cache.is_band:
            y = self.attend_band(q, k, v, cache)
        else:
            k, v, start = cache.update(k, v)
            y, _ = self.attend(self.rope(q, start, rope), self.rope(k, 0, rope), v)

        y = y.transpose(1, 2)  # (B, T, H, D)
        if cfg.gate == "headwise":
            y = y * torch.sigmoid(self.g_proj(x)).unsqueeze(-1)
        elif cfg.gate == "elementwise":
            y = y * torch.sigmoid(self.g_proj(x)).view(B, T, H, D)
        return self.o_proj(y.reshape(B, T, H * D)), weights

    def sink_logits(self) -> torch.Tensor | None:
        """b_h (n_head,) of model.sink_logit, or None without one."""
        if self.cfg.sink_logit == "learned":
            return self.sinks
        if self.cfg.sink_logit == "zero":
            return self.q_proj.weight.new_zeros(self.cfg.n_head)
        return None

    def sink_slot_values(self) -> torch.Tensor | None:
        """v_h (n_head, head_dim) of model.sink_value, each KV head's value repeated for its query heads
        (as expand_kv repeats values), or None without one."""
        if not self.cfg.sink_value:
            return None
        return self.sink_values.repeat_interleave(self.cfg.n_head // self.cfg.kv_heads, dim=0)

    def attend(self, q, k, v, return_attn: bool = False):
        """Rotated q (B,H,Tq,D) against rotated k, v (B,Hkv,Tk,D); queries are the last Tq keys.
        The weights (return_attn) and the decoding steps a fused kernel does not take go to math."""
        cfg, sink, value = self.cfg, self.sink_logits(), self.sink_slot_values()
        k, v = expand_kv(k, v, cfg.n_head)
        decoding = self.causal and q.shape[-2] != k.shape[-2]
        if not (return_attn or (decoding and not self.kernel.decodes)):
            return self.run_kernel(q, k, v, sink, value), None
        y, w = math_attention(q, k, v, cfg, self.causal, sink, value)
        if not return_attn:
            return y, None
        mass = w.sum(-1)
        sink_slot = None if sink is None else 1 - mass
        # a softpick row with every score <= 0 has mass 0: its proxy row is 0 too (it attends to nothing)
        probs = w / mass.clamp_min(torch.finfo(mass.dtype).tiny).unsqueeze(-1)
        return y, AttentionWeights(probs=probs, mass=mass, sink_slot=sink_slot)

    def attend_band(self, q, k, v, store):
        """The sink cache's parallel form (model/cache.py's BandKVCache): query i sees the sinks
        j < n_sink and the keys with 0 <= i - j < window, scored as if it had been fed alone:
        band keys and queries rotated at their stream indices (shifted to start at the oldest
        band key: relative positions, small angles), sink keys at their slots j and the query at
        its cache slot min(i, n_sink + window - 1). The scores are materialised (scores.py's
        reference), whatever the backend: one chunk's (Tq, n_sink + window - 1 + Tq) at a time."""
        cfg = self.cfg
        first, n_sink, window = store.seen, store.n_sink, store.window
        keys, values, key_index = store.update(k, v)  # ascending stream indices: the sinks first
        keys, values = expand_kv(keys, values, cfg.n_head)
        n_held_sinks = min(n_sink, store.seen)
        base = max(n_sink, first - window + 1)
        q_index = torch.arange(first, store.seen, device=q.device)
        sink_k, band_k = keys[:, :, :n_held_sinks], keys[:, :, n_held_sinks:]
        band_q, band_k = self.rope_at(q, q_index - base), self.rope_at(band_k, key_index[n_held_sinks:] - base)
        band = band_q @ band_k.transpose(-2, -1)
        sinks = self.rope_at(q, q_index.clamp(max=n_sink + window - 1)) @ self.rope_at(
            sink_k, key_index[:n_held_sinks]).transpose(-2, -1)
        distance = q_index[:, None] - key_index[None, :]
        visible = (distance >= 0) & ((key_index < n_sink)[None, :] | (distance < window))
        scores = torch.cat((sinks, band), dim=-1) * q.shape[-1] ** -0.5
        value = self.sink_slot_values()
        if value is None:
            return weights_from_scores(scores, visible, cfg, self.sink_logits()) @ values
        w, slot = weights_from_scores(scores, visible, cfg, self.sink_logits(), with_slot=True)
        return add_slot_value(w @ values, slot, value)

    def run_kernel(self, q, k, v, sink, sink_value=None):
        """The resolved backend's kernel. Whether it can run these tensors (device, dtype, forward or
        training) is asked once per combination, not on every call; a refusal names the fix."""
        kernel = self.kernel
        q, k, v = kernel.inputs(q, k, v)
        key = (q.device, q.dtype, needs_backward(q, k, v))
        if key not in self.refusals:
            self.refusals[key] = kernel.why_not(self.cfg, *key)
        if self.refusals[key]:
            raise ValueError(self.refusals[key])
        return kernel.run(q, k, v, self.cfg, self.causal, sink, sink_value)

    def attend_recurrent(self, q, k, v, state, rope=None):
        """Linear attention from its recurrent state (model/cache.py's LinearState), exactly."""
        k, v = expand_kv(k, v, self.cfg.n_head)
        q, k = self.rope(q, state.seen, rope), self.rope(k, state.seen, rope)
        y, new_state = linear_attention_chunked(q, k, v, self.cfg.linear_chunk_size, state.state)
        state.update(new_state, q.shape[-2])
        return y


def set_backend(model: nn.Module, device=None, dtype: torch.dtype | None = None) -> str:
    """Resolve every attention block of `model` for device and compute dtype; returns the description."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.set_backend(device, dtype)
    return describe_backend(model)


def describe_backend(model: nn.Module) -> str:
    """What runs the attention of `model`, e.g. 'sdpa (softmax, fp32, cpu)'."""
    return "; ".join(sorted({m.backend_description for m in model.modules() if isinstance(m, Attention)}))
