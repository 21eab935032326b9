"""Fused attention kernels for the GPU: FlexAttention for every kind with an elementwise score
function, flash-attn for softmax, and the Triton kernels: sigmoid / elu+1 (model/kernels_triton.py)
and chunked causal linear attention (model/kernels_linear.py).

Called from `Attention.attend` for backends other than math / sdpa / chunked. Every path here is
checked against `math_attention` (tests/test_kernels.py, `python -m eval.bench --check`).

FlexAttention computes out_i = sum_j exp(m(s_ij)) v_j / sum_j exp(m(s_ij)) for a score_mod m
and can return lse_i = log sum_j exp(m(s_ij)). With m = log f for a positive f,
out_i * exp(lse_i) = sum_j f(s_ij) v_j: the unnormalised sigmoid / elu+1 attention without a
T x T tensor; `attn_normalize` is `out` itself.

Queries appended to cached keys (Tq != Tk, decoding) go to `math_attention`: the weights are
only Tq x Tk there, and fixed shapes keep the compiled kernels from recompiling every step.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from .attention import linear_attention_global, math_attention
from .config import AttentionConfig

FLASH_INSTALL = "pip install flash-attn --no-build-isolation"
FLASH_AVAILABLE = importlib.util.find_spec("flash_attn") is not None
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter, for tests


def require(backend: str, cfg: AttentionConfig | None = None) -> None:
    """Fail at model construction when the backend's package is missing or cannot take the shapes."""
    if backend == "flash" and not FLASH_AVAILABLE:
        raise ValueError(f"model.backend=flash needs the flash-attn package ({FLASH_INSTALL}, CUDA only); "
                         "or use model.backend=sdpa (PyTorch's own flash kernel) or auto")
    if backend == "triton" and not TRITON_AVAILABLE:
        raise ValueError("model.backend=triton needs the triton package (pip install triton; it ships "
                         "with CUDA builds of torch); or use model.backend=flex or auto")
    if backend == "triton" and cfg is not None and (bad := triton_untileable(cfg)):
        fallback = "chunked" if cfg.attention == "linear" else "flex"
        raise ValueError(f"model.backend=triton needs powers of two from 16 to {triton_max_tile(cfg)}, got {bad}; "
                         f"change them or use model.backend={fallback} or auto")


# The linear kernel's backward holds about ten C x D fp32 tiles in shared memory: 68 KiB at
# head_dim 32, 160 KiB at 64 and 416 KiB at 128 with chunks of 64 (python -m eval.compile_kernels).
LINEAR_MAX_TILE = 64
LINEAR_SHARED_KIB = 160  # what head_dim 64 needs: A100, H100 and H200 have it, consumer GPUs do not


def triton_max_tile(cfg: AttentionConfig) -> int:
    """The largest head_dim (and linear chunk) the Triton kernels take: shared memory caps linear's."""
    return LINEAR_MAX_TILE if cfg.attention == "linear" else 128


def triton_untileable(cfg: AttentionConfig) -> dict:
    """The sizes the Triton kernels cannot tile: tl.arange and tl.dot take powers of two >= 16, up
    to triton_max_tile."""
    sizes = {"head_dim (n_embd / n_head)": cfg.head_dim}
    if cfg.attention == "linear":
        sizes["model.linear_chunk_size"] = cfg.linear_chunk_size
    return {name: n for name, n in sizes.items() if n < 16 or n > triton_max_tile(cfg) or n & (n - 1)}


def same_dtype(q, k, v):
    """One dtype for the fused kernels. Under autocast, qk_norm's RMSNorm returns fp32 q and k
    while v stays bf16: take autocast's dtype then (as SDPA does), else the widest of the three."""
    if q.dtype == k.dtype == v.dtype:
        return q, k, v
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attend(backend: str, q, k, v, cfg: AttentionConfig, causal: bool):
    """q, k, v: (B, H, T, D) rotated, heads already repeated for GQA. Returns y (B, H, Tq, D)."""
    if causal and q.shape[-2] != k.shape[-2]:
        return math_attention(q, k, v, cfg, causal)[0]
    q, k, v = same_dtype(q, k, v)
    if backend == "flex":
        return flex_attend(q, k, v, cfg, causal)
    if backend == "flash":
        return flash_attend(q, k, v, cfg, causal)
    if backend == "triton":
        require("triton")
        if q.device.type != "cuda" and not TRITON_INTERPRET:
            raise ValueError(f"model.backend=triton runs on CUDA, not {q.device.type} (the CPU only under "
                             "TRITON_INTERPRET=1, for tests); use model.backend=auto")
        if cfg.attention == "linear":
            if not causal:  # bidirectional linear attention is two matrix products already
                return linear_attention_global(q, k, v)
            from .kernels_linear import linear_attention_triton

            return linear_attention_triton(q, k, v, cfg.linear_chunk_size)
        from .kernels_triton import triton_attention

        return triton_attention(q, k, v, cfg, causal)
    raise ValueError(f"unknown attention backend {backend!r}")


# --------------------------------------------------------------------------------------------
# FlexAttention
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _score_mod(kind: str, bias: float):
    """log f(s), one function object per (kind, bias) so compiled flex does not recompile."""
    if kind == "sigmoid":
        def log_sigmoid(score, b, h, q_idx, kv_idx):
            return F.logsigmoid(score + bias)
        return log_sigmoid
    if kind == "elu1":
        def log_elu1(score, b, h, q_idx, kv_idx):  # log(elu(s) + 1) = s for s <= 0, log1p(s) above
            return torch.where(score > 0, torch.log1p(score.clamp_min(0)), score)
        return log_elu1
    return None  # softmax: the identity score_mod


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=16)
def _causal_block_mask(t: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal, None, None, t, t, device=device)


@functools.lru_cache(maxsize=None)
def _flex_fn(device_type: str):
    """Compiled flex on CUDA (the fused kernel); eager elsewhere (CPU: forward only, materialises)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def flex_attend(q, k, v, cfg: AttentionConfig, causal: bool):
    if cfg.attention not in ("softmax", "sigmoid", "elu1"):
        raise ValueError(f"model.backend=flex cannot run attention={cfg.attention!r}; use chunked or auto")
    if q.device.type != "cuda" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(f"model.backend=flex has no backward on {q.device.type} (PyTorch's FlexAttention "
                         "runs forward only there); train with model.backend=auto or math off the GPU")
    mod = _score_mod(cfg.attention, float(cfg.resolved_sigmoid_bias))
    mask = _causal_block_mask(q.shape[-2], str(q.device)) if causal else None
    flex = _flex_fn(q.device.type)
    if mod is None or cfg.attn_normalize:
        return flex(q, k, v, score_mod=mod, block_mask=mask)
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        out, lse = flex(q, k, v, score_mod=mod, block_mask=mask, return_lse=True)
    else:
        out, aux = flex(q, k, v, score_mod=mod, block_mask=mask, return_aux=AuxRequest(lse=True))
        lse = aux.lse
    return (out.float() * lse.exp().unsqueeze(-1)).to(q.dtype)


# --------------------------------------------------------------------------------------------
# flash-attn (Dao et al.), softmax only
# --------------------------------------------------------------------------------------------
def flash_attend(q, k, v, cfg: AttentionConfig, causal: bool):
    require("flash")
    if cfg.attention != "softmax":
        raise ValueError(f"model.backend=flash runs softmax only, not attention={cfg.attention!r}; use auto")
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"model.backend=flash needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device.type}; "
                         "train with train.mixed_precision=bf16 on a GPU, or use model.backend=sdpa")
    from flash_attn import flash_attn_func

    y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return y.transpose(1, 2)
