"""`flex`: PyTorch's FlexAttention for every kind with an elementwise score function.

FlexAttention computes out_i = sum_j exp(m(s_ij)) v_j / sum_j exp(m(s_ij)) for a score_mod m
and can return lse_i = log sum_j exp(m(s_ij)). With m = log f for a positive f,
out_i * exp(lse_i) = sum_j f(s_ij) v_j: the unnormalised sigmoid / elu+1 attention without a
T x T tensor; `attn_normalize` is `out` itself. Softmax with sink logits b_h is out * sigmoid(lse - b_h).
Softpick, relu(e^s - 1) / (sum_j |e^s - 1| + eps), takes two calls: m = log relu(e^s - 1) gives
out * exp(lse) = the numerator applied to v, m = log |e^s - 1| gives the denominator's log as its lse.
Compiled on CUDA; eager (forward only) elsewhere.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..scores import SOFTPICK_EPS, sink_rescale
from .base import Backend


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


def _log_expm1_pos(score):
    """log(e^s - 1) for s > 0, as s + log(1 - e^{-s}) (no overflow); s clamped so the unused branch of
    a torch.where stays finite and carries no NaN gradient."""
    s = score.clamp_min(1e-30)
    return s + torch.log(-torch.expm1(-s))


def _softpick_num(score, b, h, q_idx, kv_idx):  # log relu(e^s - 1): -inf where s <= 0
    return torch.where(score > 0, _log_expm1_pos(score), float("-inf"))


def _softpick_den(score, b, h, q_idx, kv_idx):  # log |e^s - 1|
    return torch.where(score > 0, _log_expm1_pos(score), torch.log(-torch.expm1(score.clamp_max(-1e-30))))


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


def _with_lse(flex, q, k, v, mod, mask):
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return flex(q, k, v, score_mod=mod, block_mask=mask, return_lse=True)
    out, aux = flex(q, k, v, score_mod=mod, block_mask=mask, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def flex_attention(q, k, v, cfg, causal: bool, sink=None, sink_value=None):
    if cfg.attention == "softpick":
        return _softpick(q, k, v, causal)
    mod = _score_mod(cfg.attention, float(cfg.resolved_sigmoid_bias))
    mask = _causal_block_mask(q.shape[-2], str(q.device)) if causal else None
    flex = _flex_fn(q.device.type)
    if sink is not None:
        return sink_rescale(*_with_lse(flex, q, k, v, mod, mask), sink, sink_value)
    if mod is None or cfg.attn_normalize:
        return flex(q, k, v, score_mod=mod, block_mask=mask)
    out, lse = _with_lse(flex, q, k, v, mod, mask)
    return (out.float() * lse.exp().unsqueeze(-1)).to(q.dtype)


def _softpick(q, k, v, causal: bool):
    mask = _causal_block_mask(q.shape[-2], str(q.device)) if causal else None
    flex = _flex_fn(q.device.type)
    out, lse_num = _with_lse(flex, q, k, v, _softpick_num, mask)
    _, lse_den = _with_lse(flex, q, k, v, _softpick_den, mask)
    # y = out e^{lse_num} / (e^{lse_den} + eps); a row with every s <= 0 has lse_num = -inf: y = 0
    scale = torch.exp(lse_num.float() - lse_den.float()) / (1 + SOFTPICK_EPS * torch.exp(-lse_den.float()))
    scale = torch.where(torch.isfinite(lse_num), scale, 0.0)
    return (torch.nan_to_num(out.float()) * scale.unsqueeze(-1)).to(q.dtype)


BACKEND = Backend("flex", ("softmax", "sigmoid", "elu1", "softpick"), flex_attention, trains_on=("cuda",), decodes=False,
                  one_dtype=True, sinks=True)
