"""The block both decoders build on (the GPT and the ViT): x += attn(norm(x)); x += mlp(norm(x)), its MLP
kinds and norms, the GPT-2 init, and the output both return."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention
from .config import block_option, mlp_hidden
from .norm import make_norm


ACTIVATIONS = {  # transformers' hidden_act names: gelu (erf), gelu_pytorch_tanh / gelu_new, quick_gelu
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The pretrained ViTs' kinds (`mlp`: gelu, gelu_tanh,
    quick_gelu) are down(act(up(x))): fc1 is up_proj and fc2 down_proj, so down_proj's input is the
    hidden activation for every kind."""

    def __init__(self, n_embd: int, hidden: int, kind: str = "swiglu", bias: bool = False):
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            self.gate_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.up_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(ACTIVATIONS[self.kind](self.up_proj(x)))


class Block(nn.Module):
    """x += ls1 * attn(norm(x)); x += ls2 * mlp(norm(x)). The layer scales ls (DINOv2's, CaiT's) exist
    only with `layer_scale` set."""

    def __init__(self, cfg, causal: bool = True):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, causal=causal)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg.n_embd, mlp_hidden(cfg), block_option(cfg, "mlp"), block_option(cfg, "mlp_bias"))
        scale = block_option(cfg, "layer_scale")
        if scale is not None:
            self.layer_scale1 = nn.Parameter(torch.full((cfg.n_embd,), float(scale)))
            self.layer_scale2 = nn.Parameter(torch.full((cfg.n_embd,), float(scale)))

    def forward(self, x, cache=None, return_attn: bool = False, rope=None):
        a, weights = self.self_attn(self.input_layernorm(x), cache=cache, return_attn=return_attn, rope=rope)
        if hasattr(self, "layer_scale1"):
            a = a * self.layer_scale1
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x))
        if hasattr(self, "layer_scale2"):
            m = m * self.layer_scale2
        return x + m, weights


def init_weights(model: nn.Module, n_layer: int, std: float) -> None:
    """GPT-2 / nanoGPT init: N(0, std), residual output projections scaled by 1/sqrt(2 n_layer)."""
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            nn.init.zeros_(p)  # q/k/v biases (attention_bias) start at 0, as in Qwen2
            continue
        if p.dim() < 2:
            continue  # norm weights stay at 1
        scale = 1 / math.sqrt(2 * n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        nn.init.normal_(p, mean=0.0, std=std * scale)


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    attn: list[torch.Tensor] | None = None  # per layer (B, H, T, T) row-normalised (proxy) weights
    attn_mass: list[torch.Tensor] | None = None  # per layer (B, H, T) raw row mass
    attn_sink_slot: list[torch.Tensor] | None = None  # per layer (B, H, T) sink_logit's virtual-key weight
    hidden: list[torch.Tensor] | None = None  # residual stream after each block
    # The first `sink_tokens` positions of attn, attn_mass, attn_sink_slot and hidden are the learned
    # sink tokens (model.sink_tokens); logits and loss cover the text tokens only.
    sink_tokens: int = 0
