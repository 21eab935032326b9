"""Decoding caches: passive stores that the attention block reads and updates.

    cache = model.make_cache()                 # full KV cache
    cache = model.make_cache(n_sink, window)   # StreamingLLM sink cache: n_sink first + window recent tokens
    model(idx, cache=cache)                    # feeds idx after what the cache has seen

What callers may use: `cache.seen` (tokens fed so far: the absolute position of the next one),
`len(cache)` (tokens held; for linear attention, the tokens its state summarises), `cache.capacity`
(most tokens held, None = unbounded), `cache.window` (most tokens one call may add, None =
any), `cache.nbytes()`, `cache.is_recurrent` (a fixed-size state, not tokens) and `cache.layers`
(one store per decoder layer, in order, for the attention blocks).

A layer's KVCache stores keys *before* RoPE: `update` appends new keys and values and returns
what to attend over and the cache position of the first new token; the block rotates the keys at
positions 0..n-1 and the queries at theirs. For the full cache those are the absolute positions, so
decoding equals the full forward pass. For the sink cache the evicted middle closes up and the kept
keys are re-positioned at 0..n-1: StreamingLLM's "pos shift", which lets generation run forever
in constant memory. Linear attention keeps its exact recurrent state (S, z) instead.

`make_cache(n_sink, window, band=True)` is the same sink cache in its parallel form: a call may
carry any number of tokens, and each attends to exactly what it would have seen fed one token at a
time (band attention, `BandKVCache`), so a long stream is evaluated chunk by chunk in bounded memory.
"""
from __future__ import annotations

import torch


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVCache:
    """One layer's unrotated keys and values. n_sink/window None = keep everything."""

    is_recurrent = False
    is_band = False

    def __init__(self, n_sink: int | None = None, window: int | None = None):
        if (n_sink is None) != (window is None):
            raise ValueError("a sink cache needs both n_sink and window (use neither for a full cache)")
        if window is not None and (window < 1 or n_sink < 0):
            raise ValueError(f"sink cache needs window >= 1 and n_sink >= 0, got window={window}, n_sink={n_sink}")
        self.n_sink, self.window = n_sink, window
        self.k = self.v = None
        self.seen = 0

    @property
    def capacity(self) -> int | None:
        return None if self.window is None else self.n_sink + self.window

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def nbytes(self) -> int:
        return _nbytes((self.k, self.v))

    def _evict_for(self, n_new: int) -> None:
        """Drop the oldest non-sink tokens so that n_new more still fit in the capacity."""
        if self.capacity is None or self.k is None:
            return
        excess = len(self) + n_new - self.capacity
        if excess > 0:
            keep = lambda t: torch.cat((t[:, :, : self.n_sink], t[:, :, self.n_sink + excess :]), dim=2)
            self.k, self.v = keep(self.k), keep(self.v)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Append unrotated k, v (B, Hkv, T_new, D). Returns (keys, values, start): everything held,
        at cache positions 0..len-1, and the cache position of the first new token."""
        n_new = k.shape[-2]
        if self.capacity is not None and len(self) + n_new - self.capacity > max(0, len(self) - self.n_sink):
            raise ValueError(f"cannot add {n_new} tokens at once to a sink cache with window {self.window} "
                             f"holding {len(self)} of {self.capacity}; feed at most `window` tokens per call")
        self._evict_for(n_new)
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        self.seen += n_new
        return self.k, self.v, len(self) - n_new


class BandKVCache:
    """The sink cache (n_sink first + window most recent tokens) fed many tokens per call, each
    token attending as if it had been fed alone. It holds the sinks and the last window - 1 tokens,
    unrotated, with their stream indices; `update` returns them plus the new tokens.

    Fed one token at a time, KVCache(n_sink, window) gives token i (0-based in the stream) the keys
    j <= i with j < n_sink (sinks) or i - j < window (recent). Once full it holds n_sink + window
    keys at cache slots 0..n-1 with the query in the last slot, min(i, n_sink + window - 1): a recent
    key sits i - j slots before the query, as without eviction, and sink j at slot j. The block
    rotates band keys and queries at their stream indices (relative to the oldest band key, so
    the angles stay small) and the sink columns at those slots: the same scores in one call.
    """

    is_recurrent = False
    is_band = True

    def __init__(self, n_sink: int, window: int):
        if window < 1 or n_sink < 0:
            raise ValueError(f"sink cache needs window >= 1 and n_sink >= 0, got window={window}, n_sink={n_sink}")
        self.n_sink, self.window = n_sink, window
        self.k = self.v = self.index = None
        self.seen = 0

    @property
    def capacity(self) -> int:
        return self.n_sink + self.window

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def nbytes(self) -> int:
        return _nbytes((self.k, self.v))

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Append unrotated k, v (B, Hkv, T_new, D) of the next tokens. Returns (keys, values, index):
        what is held plus the new tokens, and each one's stream index (LongTensor, ascending)."""
        new = torch.arange(self.seen, self.seen + k.shape[-2], device=k.device)
        keys = k if self.k is None else torch.cat((self.k, k), dim=2)
        values = v if self.v is None else torch.cat((self.v, v), dim=2)
        index = new if self.index is None else torch.cat((self.index, new))
        self.seen += k.shape[-2]
        # what the next tokens can still see: the sinks and the window - 1 tokens before them
        keep = (index < self.n_sink) | (index > self.seen - self.window)
        self.k, self.v, self.index = keys[:, :, keep], values[:, :, keep], index[keep]
        return keys, values, index


class LinearState:
    """Linear attention's exact recurrent state (S, z) after `seen` tokens: constant memory, nothing
    evicted. The block rotates at absolute positions before the feature map, as in the full forward."""

    is_recurrent = True
    is_band = False
    capacity = window = None

    def __init__(self):
        self.state = None  # (S (B,H,D,Dv), z (B,H,D)) in fp32, None before the first token
        self.seen = 0

    def __len__(self) -> int:
        return self.seen

    def nbytes(self) -> int:
        return _nbytes(self.state or ())

    def update(self, state, n_new: int) -> None:
        """Store the state after n_new more tokens."""
        self.state = state
        self.seen += n_new


class Cache:
    """One store per decoder layer; what callers may read is listed in the module docstring."""

    def __init__(self, layers):
        self.layers = tuple(layers)

    @property
    def seen(self) -> int:
        """Tokens fed so far (the absolute position of the next one)."""
        return self.layers[0].seen

    def __len__(self) -> int:
        """Tokens currently held (equal to `seen` until a sink cache starts evicting)."""
        return len(self.layers[0])

    @property
    def capacity(self) -> int | None:
        """The most tokens held (n_sink + window), None = unbounded."""
        return self.layers[0].capacity

    @property
    def window(self) -> int | None:
        """A sink cache's recent tokens: also the most tokens one call may add (the band form
        takes any number). None = any."""
        return self.layers[0].window

    @property
    def is_recurrent(self) -> bool:
        """A fixed-size state (linear attention) rather than tokens."""
        return self.layers[0].is_recurrent

    @property
    def is_band(self) -> bool:
        """A sink cache in its parallel form (BandKVCache): any number of tokens per call."""
        return self.layers[0].is_band

    def nbytes(self) -> int:
        """Bytes resident: K and V of every layer, or linear attention's states."""
        return sum(layer.nbytes() for layer in self.layers)


def make_cache(config, n_sink: int | None = None, window: int | None = None, band: bool = False) -> Cache:
    """Full cache (no arguments) or sink cache (n_sink + window); `band` gives the sink cache's
    parallel form (BandKVCache). `linear` gets its state, which takes any number of tokens per call.
    A model with learned sink tokens (model.sink_tokens) keeps them as the sink cache's first
    slots, in front of the n_sink first text tokens."""
    if config.attention == "linear":
        return Cache([LinearState() for _ in range(config.n_layer)])
    if n_sink is not None:
        n_sink += getattr(config, "sink_tokens", 0)
    if band:
        if n_sink is None:
            raise ValueError("band=True is the parallel form of a sink cache: give n_sink and window")
        return Cache([BandKVCache(n_sink, window) for _ in range(config.n_layer)])
    return Cache([KVCache(n_sink, window) for _ in range(config.n_layer)])
