"""Vision Transformer on the decoder's block: the same Attention (causal=False), SwiGLU MLP and RMSNorm.

Tokens in DINOv2 order [CLS, registers, patches]. CLS and patches get an absolute position
embedding (learned, or fixed 2-D sin-cos); registers get none (Darcet et al. 2024), and RoPE is
off by default (`rope: false`), so a register is the same vector wherever it sits. The head
reads the final CLS token (or the mean of the patch tokens), never the registers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionWeights, describe_backend, set_backend
from .config import AttentionConfig, check_mlp_and_init, swiglu_hidden
from .flops import block_matmul_params
from .gpt import Block, ModelOutput, init_weights

POOLS = ("cls", "mean")
POS_EMBEDS = ("learned", "sincos")


@dataclass
class ViTConfig(AttentionConfig):
    """`block_size` 0 = the token count 1 + n_registers + n_patches (it only sets the sigmoid bias)."""

    image_size: int = 8
    patch_size: int = 2
    in_channels: int = 1
    n_layer: int = 4
    n_registers: int = 0
    n_classes: int | None = None  # None = take it from the data
    pool: str = "cls"
    pos_embed: str = "learned"
    intermediate_size: int | None = None  # SwiGLU hidden width; None = 8/3 * n_embd rounded to 64
    init_std: float = 0.02
    rope: bool = False
    block_size: int = 0

    def __post_init__(self):
        if self.block_size == 0:
            self.block_size = self.n_tokens

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def n_tokens(self) -> int:
        return 1 + self.n_registers + self.n_patches

    @property
    def mlp_hidden(self) -> int:
        return swiglu_hidden(self.n_embd, self.intermediate_size)

    def validate(self) -> None:
        super().validate()
        for name in ("image_size", "patch_size", "in_channels", "n_layer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"model.image_size={self.image_size} must be a multiple of "
                             f"model.patch_size={self.patch_size}")
        check_mlp_and_init(self)
        if self.n_registers < 0:
            raise ValueError(f"model.n_registers must be >= 0, got {self.n_registers}")
        if self.n_classes is not None and self.n_classes < 2:
            raise ValueError(f"model.n_classes must be null (from the data) or >= 2, got {self.n_classes}")
        if self.pool not in POOLS:
            raise ValueError(f"model.pool={self.pool!r} is not one of {list(POOLS)}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"model.pos_embed={self.pos_embed!r} is not one of {list(POS_EMBEDS)}")
        if self.block_size < self.n_tokens:
            raise ValueError(f"model.block_size={self.block_size} is below the token count {self.n_tokens} "
                             "(1 CLS + registers + patches); set it to 0 to use the token count")


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin-cos embedding (MAE / DINOv2 style): half the channels for
    the row, half for the column."""
    if dim % 4:
        raise ValueError(f"model.pos_embed=sincos needs n_embd divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        ang = pos[:, None].double() * omega[None]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=1).float()


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        config.validate()
        if config.n_classes is None:
            raise ValueError("ViTConfig.n_classes is None: set it, or let train.py take it from the data")
        self.config = c = config
        self.patch_embed = nn.Conv2d(c.in_channels, c.n_embd, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.n_embd))
        self.registers = nn.Parameter(torch.zeros(1, c.n_registers, c.n_embd)) if c.n_registers else None
        if c.pos_embed == "learned":  # CLS + patches only: registers carry no position
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.n_patches, c.n_embd))
        else:
            pe = torch.cat((torch.zeros(1, c.n_embd), sincos_2d(c.grid, c.n_embd)))[None]
            self.register_buffer("pos_embed", pe, persistent=False)
        self.layers = nn.ModuleList(Block(c, causal=False) for _ in range(c.n_layer))
        self.norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        self.head = nn.Linear(c.n_embd, c.n_classes)
        init_weights(self, c.n_layer, c.init_std)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.zeros_(self.head.bias)

    def set_backend(self, device=None, dtype: torch.dtype | None = None) -> str:
        """As GPT.set_backend: resolve the attention backend for a device and compute dtype."""
        return set_backend(self, device, dtype)

    @property
    def attention_backend(self) -> str:
        """What runs the attention, e.g. 'sdpa (softmax, fp32, cpu)'."""
        return describe_backend(self)

    # token layout -------------------------------------------------------------------------
    @property
    def patch_start(self) -> int:
        return 1 + self.config.n_registers

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + R + N, n_embd) tokens [CLS, registers, patches]."""
        c = self.config
        if images.shape[1:] != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"images have shape {tuple(images.shape[1:])}, the model takes "
                             f"{(c.in_channels, c.image_size, c.image_size)} (C, H, W)")
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, C), row-major grid
        x = torch.cat((self.cls_token.expand(len(images), -1, -1), patches), dim=1) + self.pos_embed
        if self.registers is not None:
            x = torch.cat((x[:, :1], self.registers.expand(len(images), -1, -1), x[:, 1:]), dim=1)
        return x

    def forward(self, images, targets=None, return_attn=False, return_hidden=False) -> ModelOutput:
        """images (B, C, H, W); targets (B,) class ids. logits (B, n_classes); attn / hidden per layer."""
        x = self.embed(images)
        rope = self.layers[0].self_attn.rope_table(x.shape[1], x.device) if self.config.rope else None  # once, as GPT
        attn, mass, sink_slot, hidden = [], [], [], []
        for block in self.layers:
            x, weights = block(x, return_attn=return_attn, rope=rope)
            if isinstance(weights, AttentionWeights):
                attn.append(weights.probs)
                mass.append(weights.mass)
                sink_slot.append(weights.sink_slot)
            if return_hidden:
                hidden.append(x)
        start = self.patch_start  # (a test-time register appended after the patches is not pooled)
        pooled = x[:, 0] if self.config.pool == "cls" else x[:, start : start + self.config.n_patches].mean(1)
        logits = self.head(self.norm(pooled)).float()
        loss = None if targets is None else F.cross_entropy(logits, targets)
        sinks = return_attn and self.config.sink_logit != "none"
        return ModelOutput(logits=logits, loss=loss, attn=attn if return_attn else None,
                           attn_mass=mass if return_attn else None, attn_sink_slot=sink_slot if sinks else None,
                           hidden=hidden if return_hidden else None)


def training_flops_per_token(cfg: ViTConfig) -> float:
    """model/flops.py's PaLM count for the ViT: 6 x (block matmuls + patch embedding) per token plus
    the attention scores; the class head runs once per image and is spread over its tokens."""
    C = cfg.n_embd
    n = cfg.n_layer * block_matmul_params(cfg) + C * cfg.in_channels * cfg.patch_size**2
    n += C * (cfg.n_classes or 0) / cfg.n_tokens
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.n_tokens
