"""`sdpa`: softmax through PyTorch's fused kernels (flash / memory-efficient / cuDNN / math), any device."""
from __future__ import annotations

import torch.nn.functional as F

from ..scores import causal_mask
from .base import Backend


def sdpa_attention(q, k, v, cfg, causal: bool):
    t_q, t_k = q.shape[-2], k.shape[-2]
    if not causal or t_q == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # Queries appended after cached keys: SDPA's is_causal aligns top-left, so pass the mask.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_q, t_k, q.device))


BACKEND = Backend("sdpa", ("softmax",), sdpa_attention)
