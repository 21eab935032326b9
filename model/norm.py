"""RMSNorm with a hand-written backward on the CPU, and the norm a block builds (`make_norm`).

On the CPU torch composes rms_norm from six kernels (pow, mean, add, rsqrt, mul, mul) and autograd
differentiates each of them: fwd+bwd took 6.6 ms at (16, 256, 256) against LayerNorm's 1.1 ms (one
thread). The closed-form backward below needs four elementwise passes and two reductions: 3.1 ms.
The forward is nn.RMSNorm's own arithmetic, bit for bit; the gradients differ in rounding (~1e-6).
GPUs have a fused kernel, so there (and without grad, or below fp32, where torch's composite upcasts) the
module is nn.RMSNorm unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import block_option


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # torch's composite, op for op
        xhat = x * r
        ctx.save_for_backward(xhat, r, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, grad):
        xhat, r, weight = ctx.saved_tensors
        g_xhat = grad * weight
        g_weight = (grad * xhat).sum(dim=tuple(range(grad.dim() - 1)))
        # d xhat_i / d x_j = r (delta_ij - xhat_i xhat_j / d): project out the xhat direction, scale by r.
        dot = (g_xhat * xhat).mean(-1, keepdim=True)
        g_x = torch.addcmul(g_xhat, xhat, dot, value=-1).mul_(r)
        return g_x, g_weight, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters, state dict and forward values), trained faster on the CPU."""

    def forward(self, x):
        if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not torch.is_grad_enabled()
                or self.weight is None or self.eps is None):
            return super().forward(x)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def make_norm(cfg) -> nn.Module:
    """RMSNorm (the decoder's), or LayerNorm with a bias (`norm: layernorm`, pretrained ViTs)."""
    if block_option(cfg, "norm") == "layernorm":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
    return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
