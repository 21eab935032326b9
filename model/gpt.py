"""Llama-style decoder: embedding, N pre-norm blocks (attention + SwiGLU), RMSNorm, LM head.

Parameter names follow HF Llama (q_proj ... down_proj, rotate-half RoPE), so a softmax model
without a gate exports to LlamaForCausalLM as it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention, AttentionWeights, describe_backend, set_backend
from .cache import Cache, make_cache
from .config import GPTConfig, block_option, mlp_hidden


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


def make_norm(cfg) -> nn.Module:
    """RMSNorm (the decoder's), or LayerNorm with a bias (`norm: layernorm`, pretrained ViTs)."""
    if block_option(cfg, "norm") == "layernorm":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)


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


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        if config.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size is None: set it, or let train.py take it from the tokenizer")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        if config.sink_tokens:  # learned, prepended to every sequence; initialised like the embeddings
            self.sink_tokens = nn.Parameter(torch.zeros(1, config.sink_tokens, config.n_embd))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        init_weights(self, config.n_layer, config.init_std)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def set_backend(self, device=None, dtype: torch.dtype | None = None) -> str:
        """Resolve the attention backend for a device and compute dtype (bf16 under mixed
        precision); `auto` is also resolved when the model is built and on every .to(). Returns
        the description, as `attention_backend`."""
        return set_backend(self, device, dtype)

    @property
    def attention_backend(self) -> str:
        """What runs the attention, e.g. 'sdpa (softmax, fp32, cpu)'."""
        return describe_backend(self)

    def forward(self, idx, targets=None, return_attn=False, return_hidden=False, cache: Cache | None = None):
        """idx (B, T) token ids; targets (B, T) with -100 = ignore. With `cache`, idx are the
        next tokens after what the cache has seen; without, T must fit in block_size.
        With model.sink_tokens, the learned sink tokens go in front of the sequence (with a cache:
        in front of its first tokens) and take no part in logits and loss."""
        T = idx.shape[1]
        if cache is None and T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}; "
                             "use a cache (model.make_cache) to go further")
        x = self.embed_tokens(idx)
        n_sink_tokens = self.config.sink_tokens if cache is None or cache.seen == 0 else 0
        if n_sink_tokens:
            x = torch.cat((self.sink_tokens.expand(len(x), -1, -1).to(x.dtype), x), dim=1)
        # RoPE's cos / sin once per forward for every layer, over every position one rotates (cached keys
        # too); the sink cache's band form rotates at its own relative positions.
        rope = None
        if self.config.rope and not (cache is not None and cache.is_band):
            rope = self.layers[0].self_attn.rope_table(x.shape[1] + (len(cache) if cache is not None else 0), x.device)
        attn, mass, sink_slot, hidden = [], [], [], []
        layer_caches = [None] * len(self.layers) if cache is None else cache.layers
        for block, layer_cache in zip(self.layers, layer_caches):
            x, weights = block(x, cache=layer_cache, return_attn=return_attn, rope=rope)
            if isinstance(weights, AttentionWeights):
                attn.append(weights.probs)
                mass.append(weights.mass)
                sink_slot.append(weights.sink_slot)
            if return_hidden:
                hidden.append(x)
        logits = self.lm_head(self.norm(x[:, n_sink_tokens:])).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return ModelOutput(
            logits=logits,
            loss=loss,
            attn=attn if return_attn else None,
            attn_mass=mass if return_attn else None,
            attn_sink_slot=sink_slot if return_attn and self.config.sink_logit != "none" else None,
            hidden=hidden if return_hidden else None,
            sink_tokens=n_sink_tokens,
        )

    def make_cache(self, n_sink: int | None = None, window: int | None = None, band: bool = False) -> Cache:
        """Full cache, sink cache (n_sink + window), or with `band` the sink cache's parallel form
        (model/cache.py)."""
        return make_cache(self.config, n_sink, window, band)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, cache: Cache | None = None, generator=None, on_token=None):
        """Sample max_new_tokens after idx (B, T) with a KV cache; returns (B, T + new).

        Without a cache, a full cache is made, so the prompt plus the new tokens must fit in
        block_size; pass `make_cache(n_sink, window)` to generate without a length limit.
        `on_token(tokens (B,))` is called after each step (streaming print).
        """
        if cache is None:
            if idx.shape[1] + max_new_tokens > self.config.block_size:
                raise ValueError(
                    f"prompt ({idx.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                    f"context of {self.config.block_size}; shorten them or use a sink cache "
                    "(sample.py --n-sink S --window W)")
            cache = self.make_cache()
        logits = self._prefill(idx, cache)
        out = [idx]
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(nxt)
            if on_token is not None:
                on_token(nxt[:, 0])
            logits = self(nxt, cache=cache).logits[:, -1]
        return torch.cat(out, dim=1)

    def _prefill(self, idx, cache: Cache):
        """Feed the prompt in pieces that a sink cache can take; return the last logits."""
        step = cache.window or idx.shape[1]
        logits = None
        for start in range(0, idx.shape[1], step):
            logits = self(idx[:, start : start + step], cache=cache).logits[:, -1]
        return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from (B, V) logits: greedy at temperature 0, else top-k / nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
