"""`triton`: this repo's Triton kernels, sigmoid / elu+1 (triton_sigmoid.py) and chunked causal
linear attention (triton_linear.py), forward and backward. CUDA; the CPU only under
TRITON_INTERPRET=1, for tests."""
from __future__ import annotations

import torch

from ..scores import linear_attention_global
from .base import Backend
from .packages import TRITON_AVAILABLE, TRITON_INTERPRET

# The linear kernel's backward holds about ten C x D fp32 tiles in shared memory: 68 KiB at
# head_dim 32, 160 KiB at 64 and 416 KiB at 128 with chunks of 64 (python -m bench.compile_kernels).
LINEAR_MAX_TILE = 64
LINEAR_SHARED_KIB = 160  # what head_dim 64 needs: A100, H100 and H200 have it, consumer GPUs do not


def max_tile(cfg) -> int:
    """The largest head_dim (and linear chunk) the kernels take: shared memory caps linear's."""
    return LINEAR_MAX_TILE if cfg.attention == "linear" else 128


def untileable_sizes(cfg) -> dict:
    """The sizes the kernels cannot tile: tl.arange and tl.dot take powers of two >= 16, up to max_tile."""
    sizes = {"head_dim (n_embd / n_head)": cfg.head_dim}
    if cfg.attention == "linear":
        sizes["model.linear_chunk_size"] = cfg.linear_chunk_size
    return {name: n for name, n in sizes.items() if n < 16 or n > max_tile(cfg) or n & (n - 1)}


def untileable(cfg) -> str | None:
    if bad := untileable_sizes(cfg):
        fallback = "chunked" if cfg.attention == "linear" else "flex"
        return (f"model.backend=triton needs powers of two from 16 to {max_tile(cfg)}, got {bad}; "
                f"change them or use model.backend={fallback} or auto")
    return None


def shared_memory_kib(device) -> float:
    """Shared memory one CUDA thread block may use on this GPU (the opt-in maximum)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin / 1024


def auto_ok(cfg, device) -> bool:
    """`auto` takes it on a real GPU, and for linear only where the backward's tiles fit."""
    return device.type == "cuda" and (cfg.attention != "linear" or shared_memory_kib(device) >= LINEAR_SHARED_KIB)


def triton_attention(q, k, v, cfg, causal: bool):
    if cfg.attention == "linear":
        if not causal:  # bidirectional linear attention is two matrix products already
            return linear_attention_global(q, k, v)
        from .triton_linear import linear_attention_triton

        return linear_attention_triton(q, k, v, cfg.linear_chunk_size)
    from .triton_sigmoid import sigmoid_family_attention

    return sigmoid_family_attention(q, k, v, cfg, causal)


BACKEND = Backend(
    "triton", ("sigmoid", "elu1", "linear"), triton_attention,
    devices=("cuda", "cpu") if TRITON_INTERPRET else ("cuda",),
    missing=None if TRITON_AVAILABLE else ("model.backend=triton needs the triton package (pip install triton; it "
                                           "ships with CUDA builds of torch); or use model.backend=flex or auto"),
    untileable=untileable, decodes=False, one_dtype=True, auto_ok=auto_ok,
    device_note=" (the CPU only under TRITON_INTERPRET=1, for tests)")
