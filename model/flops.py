"""Model FLOPs per token and accelerator peaks, for MFU (model FLOPs utilisation).

MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the device, with the PaLM count
(Chowdhery et al. 2022, appendix B): 6 N + 12 L H D T per token for training.
"""
from __future__ import annotations

import torch

from .config import block_option, mlp_hidden

# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity), from the vendors' data sheets.
# Matched by substring of torch.cuda.get_device_name(); the first match wins.
GPU_PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / NVL
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 125.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16
    ("T4", 65.0),  # fp16
]


def block_matmul_params(cfg) -> int:
    """Weights multiplied per token in one block: q/k/v/o, the gate, and the MLP (SwiGLU: 3
    matrices; the GELU kinds of imported ViTs: 2)."""

    H, D, C = cfg.n_head, cfg.head_dim, cfg.n_embd
    attn = C * H * D + 2 * C * cfg.kv_heads * D + H * D * C
    attn += {"none": 0, "headwise": C * H, "elementwise": C * H * D}[cfg.gate]
    return attn + (3 if block_option(cfg, "mlp") == "swiglu" else 2) * C * mlp_hidden(cfg)


def training_flops_per_token(cfg, seq_len: int) -> float:
    """6 * (non-embedding params) + 12 * n_layer * n_head * head_dim * T (attention scores)."""
    n = cfg.n_layer * block_matmul_params(cfg) + cfg.n_embd * cfg.vocab_size  # the LM head's matmul counts
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def peak_tflops(device: torch.device | str) -> float | None:
    """Peak dense bf16 TFLOP/s of a CUDA device, or None when unknown (CPU: no MFU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in name:
            return tflops
    return None
