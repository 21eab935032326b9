"""`chunked`: linear attention in plain PyTorch, linear in T (model/scores.py's chunked and global forms)."""
from __future__ import annotations

from ..scores import linear_attention_chunked, linear_attention_global
from .base import Backend


def chunked_attention(q, k, v, cfg, causal: bool):
    if not causal:
        return linear_attention_global(q, k, v)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError("chunked linear attention takes equal query and key lengths; "
                         "decode with the recurrent state (model/cache.py)")
    return linear_attention_chunked(q, k, v, cfg.linear_chunk_size)[0]


BACKEND = Backend("chunked", ("linear",), chunked_attention)
