"""`sdpa`: softmax through PyTorch's fused kernels (flash / memory-efficient / cuDNN / math), any device.

With sink logits the output is rescaled by sigmoid(lse - b_h) (plus the slot's value at sigmoid(b_h - lse)), which is exact; SDPA does not
return lse, so it is taken from the masked scores (a Tq x Tk fp32 tensor, as `math` holds; the
flex backend gets lse from its kernel)."""
from __future__ import annotations

import torch.nn.functional as F

from ..scores import causal_mask, masked_scores, sink_rescale
from .base import Backend


def sdpa_attention(q, k, v, cfg, causal: bool, sink=None, sink_value=None):
    y = softmax_attention(q, k, v, causal)
    return y if sink is None else sink_rescale(y, masked_scores(q, k, causal).logsumexp(-1), sink, sink_value)


def softmax_attention(q, k, v, causal: bool):
    t_q, t_k = q.shape[-2], k.shape[-2]
    if not causal or t_q == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # Queries appended after cached keys: SDPA's is_causal aligns top-left, so pass the mask.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_q, t_k, q.device))


BACKEND = Backend("sdpa", ("softmax",), sdpa_attention, sinks=True)
