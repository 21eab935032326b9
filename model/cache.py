"""Decoding caches: full KV cache, StreamingLLM sink cache, and linear attention's recurrent state.

KV caches store keys *before* RoPE and rotate them at their position inside the cache each
step. For the full cache that position is the absolute one, so decoding equals the full
forward pass. For the sink cache (`n_sink` first tokens + `window` most recent ones) the
evicted middle closes up and the kept keys are re-positioned at 0..n-1: StreamingLLM's
"pos shift", which lets generation run forever in constant memory.
"""
from __future__ import annotations

import torch

from .attention import expand_kv, linear_attention_chunked


class KVCache:
    """One layer's keys and values. n_sink/window None = keep everything."""

    def __init__(self, n_sink: int | None = None, window: int | None = None):
        if (n_sink is None) != (window is None):
            raise ValueError("a sink cache needs both n_sink and window (use neither for a full cache)")
        if window is not None and (window < 1 or n_sink < 0):
            raise ValueError(f"sink cache needs window >= 1 and n_sink >= 0, got window={window}, n_sink={n_sink}")
        self.n_sink, self.window = n_sink, window
        self.k = self.v = None

    @property
    def capacity(self) -> int | None:
        return None if self.window is None else self.n_sink + self.window

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def evict_for(self, n_new: int) -> None:
        """Drop the oldest non-sink tokens so that n_new more still fit in the capacity."""
        if self.capacity is None or self.k is None:
            return
        if n_new > self.window:
            raise ValueError(f"cannot add {n_new} tokens at once to a sink cache with window {self.window}; "
                             "feed at most `window` tokens per call")
        excess = len(self) + n_new - self.capacity
        if excess > 0:
            keep = lambda t: torch.cat((t[:, :, : self.n_sink], t[:, :, self.n_sink + excess :]), dim=2)
            self.k, self.v = keep(self.k), keep(self.v)

    def attend(self, attn, q, k, v):
        """Append unrotated k, v; attend rotated q at the new tokens' cache positions."""
        self.evict_for(k.shape[-2])
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        n = len(self)
        q = attn.rope(q, n - q.shape[-2])
        y, _ = attn.attend(q, attn.rope(self.k, 0), self.v)
        return y


class LinearState:
    """Linear attention's exact recurrent state (S, z): constant memory, nothing evicted.

    RoPE is applied at absolute positions before the feature map, as in the full forward.
    """

    def __init__(self):
        self.state = None
        self.position = 0

    def __len__(self) -> int:
        return self.position

    def attend(self, attn, q, k, v):
        k, v = expand_kv(k, v, attn.cfg.n_head)
        q, k = attn.rope(q, self.position), attn.rope(k, self.position)
        y, self.state = linear_attention_chunked(q, k, v, attn.cfg.linear_chunk_size, self.state)
        self.position += q.shape[-2]
        return y


class Cache:
    """One cache per layer, plus the number of tokens seen so far (absolute positions)."""

    def __init__(self, layers):
        self.layers = layers
        self.seen = 0

    def __len__(self) -> int:
        """Tokens currently held (equal to `seen` until a sink cache starts evicting)."""
        return len(self.layers[0])


def make_cache(config, n_sink: int | None = None, window: int | None = None) -> Cache:
    """Full cache (no arguments) or sink cache (n_sink + window). `linear` gets its state."""
    if config.attention == "linear":
        return Cache([LinearState() for _ in range(config.n_layer)])
    return Cache([KVCache(n_sink, window) for _ in range(config.n_layer)])
