"""`flash`: the flash-attn package (Dao et al.), softmax in fp16 / bf16 on CUDA."""
from __future__ import annotations

import torch

from .base import Backend
from .packages import FLASH_AVAILABLE

INSTALL = "pip install flash-attn --no-build-isolation"


def flash_attention(q, k, v, cfg, causal: bool):
    from flash_attn import flash_attn_func

    y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return y.transpose(1, 2)


BACKEND = Backend(
    "flash", ("softmax",), flash_attention, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16),
    missing=None if FLASH_AVAILABLE else (f"model.backend=flash needs the flash-attn package ({INSTALL}, CUDA only); "
                                          "or use model.backend=sdpa (PyTorch's own flash kernel) or auto"),
    decodes=False, one_dtype=True, fix="sdpa")
