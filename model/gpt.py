"""Llama-style decoder: embedding, N pre-norm blocks (attention + SwiGLU), RMSNorm, LM head.

Parameter names follow HF Llama (q_proj ... down_proj, rotate-half RoPE), so a softmax model
without a gate exports to LlamaForCausalLM as it is.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionWeights, describe_backend, set_backend
from .block import Block, ModelOutput, init_weights
from .cache import Cache, make_cache
from .config import GPTConfig
from .norm import RMSNorm


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
        self.norm = RMSNorm(config.n_embd, eps=config.norm_eps)
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
