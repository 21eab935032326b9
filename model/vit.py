"""Vision Transformer on the decoder's block: the same Attention (causal=False), SwiGLU MLP and RMSNorm.

Tokens in DINOv2 order [CLS, registers, patches]. CLS and patches get an absolute position
embedding (learned, or fixed 2-D sin-cos); registers get none (Darcet et al. 2024), and RoPE is
off by default (`rope: false`), so a register is the same vector wherever it sits. The head
reads the final CLS token (or the mean of the patch tokens), never the registers.

The fields after `block_size` exist for pretrained ViTs (model/interop/hf_vit.py: DINOv2, DINOv2 with
registers, ViT / DeiT, CLIP vision): LayerNorm with biases, GELU MLPs with biases, an o_proj
bias, DINOv2's layer scale, CLIP's norm before the first block, a patch projection without bias,
a learned position table stored at another grid (bicubic-resampled to this one at every forward,
as DINOv2 does), and their heads. Their defaults build the lab's own ViT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionWeights, describe_backend, set_backend
from .config import MLPS, NORMS, AttentionConfig, check_mlp_and_init, mlp_hidden
from .flops import block_matmul_params
from .block import Block, ModelOutput, init_weights
from .norm import make_norm

POOLS = ("cls", "mean")
POS_EMBEDS = ("learned", "sincos")
# linear: logits = head(norm(pooled)); tanh: tanh of that (ViT's pooler); none: norm(pooled) itself,
# the pooled feature of an imported backbone
HEADS = ("linear", "tanh", "none")


@dataclass
class ViTConfig(AttentionConfig):
    """`block_size` 0 = the token count 1 + n_registers + n_patches (it only sets the sigmoid bias)."""

    image_size: int = 8  # input height and width in pixels
    patch_size: int = 2  # square patch side in pixels
    in_channels: int = 1  # image channels (1 digits, 3 RGB)
    n_layer: int = 4  # transformer blocks
    n_registers: int = 0  # learned register tokens after CLS (Darcet et al. 2024)
    n_classes: int | None = None  # None = take it from the data
    pool: str = "cls"  # cls | mean: what the classifier reads, the CLS token or the mean of the patches
    pos_embed: str = "learned"  # learned | sincos: position embedding of the patches
    intermediate_size: int | None = None  # SwiGLU hidden width; None = 8/3 * n_embd rounded to 64
    init_std: float = 0.02  # std of the normal init of the weight matrices
    rope: bool = False  # off: the patches carry absolute position embeddings
    block_size: int = 0  # 0 = the token count (it only sets the sigmoid bias)
    # pretrained-ViT options (module docstring); the defaults are the lab's ViT
    norm: str = "rmsnorm"  # or layernorm (with a bias), also for the final norm
    mlp: str = "swiglu"  # gelu, gelu_tanh, quick_gelu: up -> act -> down, width intermediate_size or 4 n_embd
    mlp_bias: bool = False  # biases on the MLP projections
    o_proj_bias: bool = False  # a bias on the attention output projection
    layer_scale: float | None = None  # per-channel scales on both residual branches, initialised at this value
    pre_norm: bool = False  # a norm on the tokens before the first block (CLIP's pre_layrnorm)
    patch_bias: bool = True  # the patch projection's bias (CLIP has none)
    pos_embed_grid: int | None = None  # learned table's grid when it differs from image_size / patch_size
    pos_embed_antialias: bool = False  # resample that table with antialiasing (DINOv2 with registers)
    head: str = "linear"  # linear | tanh | none (HEADS): what turns the pooled token into the output

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
        return mlp_hidden(self)

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
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("head", HEADS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        if self.layer_scale is not None and self.layer_scale <= 0:
            raise ValueError(f"model.layer_scale must be null (none) or > 0, got {self.layer_scale}")
        if self.pos_embed_grid is not None and (self.pos_embed_grid <= 0 or self.pos_embed != "learned"):
            raise ValueError(f"model.pos_embed_grid={self.pos_embed_grid} needs pos_embed=learned and a positive "
                             "grid (null = image_size / patch_size)")
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
        if config.n_classes is None and config.head != "none":
            raise ValueError("ViTConfig.n_classes is None: set it, or let train.py take it from the data")
        self.config = c = config
        self.patch_embed = nn.Conv2d(c.in_channels, c.n_embd, c.patch_size, stride=c.patch_size, bias=c.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.n_embd))
        self.registers = nn.Parameter(torch.zeros(1, c.n_registers, c.n_embd)) if c.n_registers else None
        if c.pos_embed == "learned":  # CLS + patches only: registers carry no position
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (c.pos_embed_grid or c.grid) ** 2, c.n_embd))
        else:
            pe = torch.cat((torch.zeros(1, c.n_embd), sincos_2d(c.grid, c.n_embd)))[None]
            self.register_buffer("pos_embed", pe, persistent=False)
        if c.pre_norm:
            self.pre_norm = make_norm(c)
        self.layers = nn.ModuleList(Block(c, causal=False) for _ in range(c.n_layer))
        self.norm = make_norm(c)
        if c.head != "none":
            self.head = nn.Linear(c.n_embd, c.n_classes)
        init_weights(self, c.n_layer, c.init_std)  # biases at 0; norms and layer scales keep their values

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
        x = torch.cat((self.cls_token.expand(len(images), -1, -1), patches), dim=1) + self.position_embedding()
        if self.registers is not None:
            x = torch.cat((x[:, :1], self.registers.expand(len(images), -1, -1), x[:, 1:]), dim=1)
        return self.pre_norm(x) if self.config.pre_norm else x

    def position_embedding(self) -> torch.Tensor:
        """(1, 1 + n_patches, C) for CLS and the patches. A learned table stored at another grid
        (`pos_embed_grid`) is resampled to this one as DINOv2 / transformers do: bicubic,
        align_corners=False, in fp32 (antialiased with `pos_embed_antialias`); CLS's row is kept."""
        c, pe = self.config, self.pos_embed
        stored = c.pos_embed_grid or c.grid
        if stored == c.grid:
            return pe
        table = pe[:, 1:].reshape(1, stored, stored, -1).permute(0, 3, 1, 2).float()
        table = F.interpolate(table, size=(c.grid, c.grid), mode="bicubic", align_corners=False,
                              antialias=c.pos_embed_antialias).to(pe.dtype)
        return torch.cat((pe[:, :1], table.permute(0, 2, 3, 1).reshape(1, c.n_patches, -1)), dim=1)

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
        logits = self.norm(pooled)
        if self.config.head != "none":
            logits = self.head(logits)
        logits = (torch.tanh(logits) if self.config.head == "tanh" else logits).float()
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
