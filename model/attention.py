"""The attention block shared by the decoder (causal) and the ViT (bidirectional).

Score functions f(s) with s = q.k / sqrt(d), applied to the (masked) keys of each query:

    softmax   w_ij = exp(s_ij) / sum_j exp(s_ij)
    sigmoid   w_ij = sigmoid(s_ij + b)            (b = sigmoid_bias, default -log(block_size))
    elu1      w_ij = elu(s_ij) + 1                (Gu et al. 2025)
    linear    w_ij = phi(q_i).phi(k_j) / sum_j phi(q_i).phi(k_j),  phi = elu + 1
              (Katharopoulos et al. 2020; computed in linear time, never as a T x T matrix)

`attn_normalize` divides sigmoid / elu1 rows by their sum. The optional output gate
(Qiu et al. 2025, position G1) multiplies each head's output by sigmoid(x W_g) before o_proj.

Every fast path is tested against `math_attention`, which materialises the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AttentionConfig
from .rope import apply_rope, rope_cos_sin, scaled_rope_frequencies


@dataclass
class AttentionWeights:
    """What `return_attn` gives per layer.

    probs: (B, H, Tq, Tk) row-normalised weights. For kinds without row normalisation this is
           Gu et al.'s proxy w / sum_j(w), so sink metrics mean the same thing for every kind.
    mass:  (B, H, Tq) raw row mass sum_j(w) actually applied to the values (1 for softmax,
           linear and the normalised variants).
    """

    probs: torch.Tensor
    mass: torch.Tensor


def causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """Bool (Tq, Tk): query i sits at key position t_k - t_q + i and sees keys up to it."""
    offset = t_k - t_q
    q_pos = torch.arange(t_q, device=device)[:, None] + offset
    return torch.arange(t_k, device=device)[None, :] <= q_pos


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0, the kernel feature map of linear attention."""
    return F.elu(x) + 1


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> fp32; fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def unnormalised_weights(scores: torch.Tensor, kind: str, sigmoid_bias: float) -> torch.Tensor:
    """f(s) for the kinds whose weights need no row statistics."""
    if kind == "sigmoid":
        return torch.sigmoid(scores + sigmoid_bias)
    if kind == "elu1":
        return F.elu(scores) + 1
    raise ValueError(f"no elementwise weight function for attention kind {kind!r}")


def math_attention(q, k, v, cfg: AttentionConfig, causal: bool):
    """Reference: materialise the weights. q: (B,H,Tq,D), k, v: (B,H,Tk,D). Returns (y, w)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    mask = causal_mask(t_q, t_k, q.device) if causal else None
    if cfg.attention == "linear":
        w = feature_map(q) @ feature_map(k).transpose(-2, -1)
    else:
        w = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if cfg.attention == "softmax":
        if mask is not None:
            w = w.masked_fill(~mask, float("-inf"))
        w = torch.softmax(w, dim=-1, dtype=torch.promote_types(w.dtype, torch.float32)).to(q.dtype)
    else:
        if cfg.attention != "linear":
            w = unnormalised_weights(w, cfg.attention, cfg.resolved_sigmoid_bias)
        if mask is not None:
            w = w.masked_fill(~mask, 0.0)
        if cfg.attention == "linear" or cfg.attn_normalize:
            w = w / w.sum(dim=-1, keepdim=True)
    return w @ v, w


def sdpa_attention(q, k, v, causal: bool):
    """Softmax through PyTorch's fused kernels (flash / memory-efficient / cuDNN / math)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    if not causal or t_q == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # Queries appended after cached keys: SDPA's is_causal aligns top-left, so pass the mask.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_q, t_k, q.device))


def linear_attention_chunked(q, k, v, chunk_size: int, state=None):
    """Causal linear attention in O(T) memory, with an optional recurrent state carried in.

    q, k: (B,H,T,D); v: (B,H,T,Dv). state = (S, z) with S = sum_j phi(k_j) v_j^T (B,H,D,Dv) and
    z = sum_j phi(k_j) (B,H,D) over earlier tokens, fp32. Within a chunk the weights are
    materialised (C x C); across chunks only S and z travel. Returns (y in v's dtype, new_state).
    chunk_size=1 is exactly the recurrent (RNN) form.

    Computed in fp32 whatever the input dtype: the division by phi(q).z cancels much of the
    numerator's gradient, and bf16 features and states put dq and dk over 1e-2 relative error.
    """
    out_dtype = v.dtype
    phi_q, phi_k, v = feature_map(at_least_fp32(q)), feature_map(at_least_fp32(k)), at_least_fp32(v)
    B, H, T, D = phi_q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:  # zero features at the end: they add nothing to any real query
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    N = (T + pad) // C
    q_c = phi_q.view(B, H, N, C, D)
    k_c = phi_k.view(B, H, N, C, D)
    v_c = v.view(B, H, N, C, Dv)

    intra = (q_c @ k_c.transpose(-2, -1)).tril()  # (B,H,N,C,C), causal within the chunk
    num = intra @ v_c
    den = intra.sum(-1)

    kv = k_c.transpose(-2, -1) @ v_c  # (B,H,N,D,Dv): each chunk's contribution to S
    ksum = k_c.sum(-2)  # (B,H,N,D)
    S_prev = kv.cumsum(2) - kv  # exclusive prefix sums: what earlier chunks left behind
    z_prev = ksum.cumsum(2) - ksum
    if state is not None:
        S_prev = S_prev + state[0].unsqueeze(2)
        z_prev = z_prev + state[1].unsqueeze(2)
    num = num + q_c @ S_prev
    den = den + (q_c * z_prev.unsqueeze(-2)).sum(-1)
    y = (num / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)).reshape(B, H, N * C, Dv)[:, :, :T]
    y = y.to(out_dtype)
    new_state = (S_prev[:, :, -1] + kv[:, :, -1], z_prev[:, :, -1] + ksum[:, :, -1])
    return y, new_state


def linear_attention_global(q, k, v):
    """Non-causal linear attention (ViT): every query sees every key, O(T); fp32 inside as above."""
    phi_q, phi_k = feature_map(at_least_fp32(q)), feature_map(at_least_fp32(k))
    S = phi_k.transpose(-2, -1) @ at_least_fp32(v)  # (B,H,D,Dv)
    z = phi_k.sum(-2)  # (B,H,D)
    return ((phi_q @ S) / (phi_q * z.unsqueeze(-2)).sum(-1, keepdim=True)).to(v.dtype)


def expand_kv(k, v, n_head: int):
    """Grouped-query attention: repeat each of the Hkv key/value heads for its n_head/Hkv query heads."""
    rep = n_head // k.shape[1]
    return (k, v) if rep == 1 else (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))


def shared_memory_kib(device) -> float:
    """Shared memory one CUDA thread block may use on this GPU (the opt-in maximum)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin / 1024


def resolve_backend(cfg: AttentionConfig, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """`auto` -> the fastest path known to be correct for this kind on this device and dtype.

    softmax: flash-attn when installed (fp16/bf16 CUDA), else SDPA. On CUDA, sigmoid / elu1 /
    linear: the Triton kernels when triton is installed and the sizes tile (for linear, also when
    the GPU has the shared memory), else FlexAttention / chunked PyTorch (measured at about 5x
    flash softmax: DESIGN.md). Elsewhere: materialised weights (flex has no CPU backward) and
    chunked linear attention."""
    if cfg.backend != "auto":
        return cfg.backend
    from . import kernels

    cuda = torch.device(device).type == "cuda"
    if cfg.attention == "softmax":
        half = dtype in (torch.float16, torch.bfloat16)
        return "flash" if cuda and half and kernels.FLASH_AVAILABLE else "sdpa"
    if cuda and kernels.TRITON_AVAILABLE and not kernels.triton_untileable(cfg) and (
            cfg.attention != "linear" or shared_memory_kib(device) >= kernels.LINEAR_SHARED_KIB):
        return "triton"
    if cfg.attention == "linear":
        return "chunked"
    return "flex" if cuda else "math"


class Attention(nn.Module):
    """Multi-head attention with RoPE, optional QK-norm, pluggable scores and output gate."""

    def __init__(self, cfg: AttentionConfig, causal: bool = True):
        super().__init__()
        cfg.validate()
        if cfg.backend in ("flash", "triton"):
            from . import kernels

            kernels.require(cfg.backend, cfg)  # a missing package fails here, not at the first step
        self.cfg, self.causal = cfg, causal
        H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.n_embd, Hkv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.n_embd, Hkv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, cfg.n_embd, bias=False)
        if cfg.gate != "none":
            self.g_proj = nn.Linear(cfg.n_embd, H if cfg.gate == "headwise" else H * D, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(D, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(D, eps=cfg.norm_eps)
        # A plain attribute, not a buffer: module casts (bf16 under DeepSpeed) must not round it.
        self.inv_freq = scaled_rope_frequencies(cfg)

    def rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x (B,H,T,D) as if it sat at positions start .. start+T-1."""
        if not self.cfg.rope:
            return x
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        positions = torch.arange(start, start + x.shape[-2], device=x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        return apply_rope(x, cos, sin)

    def forward(self, x: torch.Tensor, cache=None, return_attn: bool = False):
        """x: (B, T, n_embd) normed input. cache: this layer's cache (model/cache.py) or None.

        Returns (y, AttentionWeights or None).
        """
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)

        weights = None
        if cache is not None:
            y = cache.attend(self, q, k, v)
        else:
            q, k = self.rope(q, 0), self.rope(k, 0)
            y, weights = self.attend(q, k, v, return_attn)

        y = y.transpose(1, 2)  # (B, T, H, D)
        if cfg.gate == "headwise":
            y = y * torch.sigmoid(self.g_proj(x)).unsqueeze(-1)
        elif cfg.gate == "elementwise":
            y = y * torch.sigmoid(self.g_proj(x)).view(B, T, H, D)
        return self.o_proj(y.reshape(B, T, H * D)), weights

    def attend(self, q, k, v, return_attn: bool = False):
        """Rotated q (B,H,Tq,D) against rotated k, v (B,Hkv,Tk,D); queries are the last Tq keys."""
        cfg = self.cfg
        k, v = expand_kv(k, v, cfg.n_head)
        backend = "math" if return_attn else resolve_backend(cfg, q.device, q.dtype)
        if backend == "math":
            y, w = math_attention(q, k, v, cfg, self.causal)
            if not return_attn:
                return y, None
            mass = w.sum(-1)
            return y, AttentionWeights(probs=w / mass.unsqueeze(-1), mass=mass)
        if backend == "sdpa":
            return sdpa_attention(q, k, v, self.causal), None
        if backend == "chunked":
            if not self.causal:
                return linear_attention_global(q, k, v), None
            if q.shape[-2] != k.shape[-2]:
                raise ValueError("chunked linear attention takes equal query and key lengths; "
                                 "decode with the recurrent state (model/cache.py)")
            return linear_attention_chunked(q, k, v, cfg.linear_chunk_size)[0], None
        from . import kernels  # GPU fast paths (flex / flash / triton), imported only when asked for

        return kernels.attend(backend, q, k, v, cfg, self.causal), None
