"""`math`: materialise the weights (model/scores.py). The reference every other backend is tested
against, and the path for `return_attn` and for decoding steps the fused kernels do not take."""
from __future__ import annotations

from ..scores import ATTENTION_KINDS, math_attention
from .base import Backend

BACKEND = Backend("math", ATTENTION_KINDS, lambda q, k, v, cfg, causal, sink=None, sink_value=None: math_attention(q, k, v, cfg, causal, sink, sink_value)[0],
                  sinks=True)
