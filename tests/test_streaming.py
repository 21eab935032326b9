"""eval/streaming.py against independent references: the full forward pass (nothing evicted), a
fresh forward over the retained tokens at positions 0..n-1 (one layer, where pos-shift is exact),
and per-window forwards for the recomputation baseline; the cache never grows past S+W. The exact
parallel form (the default) against token-by-token decoding (--exact-decode), with its memory flat
in the stream length."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from eval.streaming import MAX_BINS, binned_nll, cache_bytes, evaluate, long_stream, position_bins, recompute_nll, stream_nll
from model import GPT, GPTConfig

V = 64


def tiny(ref, attention="softmax", gate="none", n_layer=2, block_size=32, seed=0):
    cfg = GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, block_size=block_size, vocab_size=V,
                    attention=attention, gate=gate, qk_norm=attention == "sigmoid")
    return ref.randomize_(GPT(cfg), seed).eval()  # peaked attention: evictions change the output


def full_forward_nll(model, tokens):
    with torch.no_grad():
        logits = model(tokens[None, :-1]).logits[0]
    return F.cross_entropy(logits, tokens[1:], reduction="none")


@pytest.mark.parametrize("attention,gate", [("softmax", "none"), ("sigmoid", "none"), ("elu1", "none"),
                                            ("linear", "none"), ("softmax", "elementwise")])
def test_window_covering_the_text_equals_full_forward(ref, attention, gate):
    model = tiny(ref, attention, gate)
    tokens = torch.randint(0, V, (29,))  # 28 predictions: fits 0+28, 4+28 and recompute over 32
    expected = full_forward_nll(model, tokens)
    result = evaluate(model, tokens, n_sink=4, window=28)
    curves = result._curves
    assert set(curves) == ({"recurrent"} if attention == "linear" else {"window", "sinks", "recompute"})
    for mode, nll in curves.items():
        ref.close(torch.from_numpy(nll), expected, tol=1e-4, what=mode)
        assert math.isclose(result.modes[mode]["ppl"], math.exp(expected.mean().item()), rel_tol=1e-4)


@pytest.mark.parametrize("attention,gate", [("softmax", "none"), ("sigmoid", "none"), ("softmax", "headwise")])
def test_one_layer_sink_cache_equals_fresh_forward_on_retained_tokens(ref, attention, gate):
    """After eviction, token t is predicted from tokens[:S] + tokens[t-W+1..t] placed at
    positions 0..S+W-1. With one layer the cached keys depend on their own token only, so the
    streamed NLL must equal a fresh forward over exactly those tokens."""
    S, W, N = 3, 6, 40
    model = tiny(ref, attention, gate, n_layer=1)
    tokens = torch.randint(0, V, (N,))
    nll = torch.from_numpy(stream_nll(model, tokens, model.make_cache(S, W))["nll"])
    expected = []
    for t in range(N - 1):
        kept = list(range(t + 1)) if t + 1 <= S + W else list(range(S)) + list(range(t - W + 1, t + 1))
        with torch.no_grad():
            logits = model(tokens[kept][None]).logits[0, -1]
        expected.append(F.cross_entropy(logits[None], tokens[t + 1 : t + 2]))
    expected = torch.stack(expected)
    ref.close(nll, expected, tol=1e-4, what="sink cache vs fresh forward")
    # the eviction is real: past the window the streamed NLL differs from a full (unevicted) cache's
    full = torch.from_numpy(stream_nll(model, tokens, model.make_cache())["nll"])
    ref.close(full[: S + W], nll[: S + W], tol=1e-4, what="before eviction")
    assert (nll[S + W :] - full[S + W :]).abs().max() > 1e-3


def test_peak_cache_stays_s_plus_w(ref):
    S, W = 4, 12
    model = tiny(ref)
    cfg = model.config
    D = cfg.n_embd // cfg.n_head
    per_token = 2 * cfg.n_layer * cfg.n_head * D * 4  # K and V, float32
    for n in (50, 200):
        cache = model.make_cache(S, W)
        res = stream_nll(model, torch.randint(0, V, (n,)), cache)
        assert res["cache_tokens_peak"] == S + W
        assert all(len(layer) == S + W for layer in cache.layers)
        assert res["cache_bytes_peak"] == cache_bytes(cache) == (S + W) * per_token
        window_only = stream_nll(model, torch.randint(0, V, (n,)), model.make_cache(0, W))
        assert window_only["cache_tokens_peak"] == W


def test_recompute_matches_per_window_forward(ref):
    model = tiny(ref)
    tokens = torch.randint(0, V, (60,))
    ctx, stride = 10, 3
    res = recompute_nll(model, tokens, ctx, stride=stride, batch_size=4)
    nll = torch.from_numpy(res["nll"])
    for t in range(59):
        if t < ctx or (t - ctx) % stride == 0:
            lo = max(0, t - ctx + 1)
            with torch.no_grad():
                logits = model(tokens[None, lo : t + 1]).logits[0, -1]
            want = F.cross_entropy(logits[None], tokens[t + 1 : t + 2])
            assert abs(nll[t].item() - want.item()) < 1e-4, t
        else:
            assert torch.isnan(nll[t]), t


@pytest.mark.parametrize("order,keys", [("reference", 3 + 6 + 1), ("evict-first", 3 + 6)])
def test_order_sets_the_keys_a_query_sees(ref, order, keys):
    """StreamingLLM's eval trims the cache after the forward, so a query sees S+W+1 keys (the S
    first and the W+1 most recent tokens); evict-first sees S+W. One layer: the streamed NLL
    equals a fresh forward over exactly those tokens. Window-only keeps the same total cache."""
    S, W, N = 3, 6, 30
    model = tiny(ref, n_layer=1)
    tokens = torch.randint(0, V, (N,))
    result = evaluate(model, tokens, n_sink=S, window=W, modes=("window", "sinks"), order=order)
    assert result.keys_per_query == result.first_eviction == keys
    recent = keys - S
    for mode, n_first in (("sinks", S), ("window", 0)):
        expected = []
        for t in range(N - 1):
            kept = list(range(t + 1)) if t + 1 <= keys else list(range(n_first)) + list(range(t - (keys - n_first) + 1, t + 1))
            with torch.no_grad():
                logits = model(tokens[kept][None]).logits[0, -1]
            expected.append(F.cross_entropy(logits[None], tokens[t + 1 : t + 2]))
        ref.close(torch.from_numpy(result._curves[mode]), torch.stack(expected), tol=1e-4, what=f"{mode} {order}")
    assert recent == W + (order == "reference")


def test_bos_prefixed_stream(ref):
    model = tiny(ref)
    tokens = torch.randint(1, V, (20,))
    result = evaluate(model, tokens, n_sink=2, window=8, modes=("sinks",), bos_id=0)
    assert result.bos_first and result.n_tokens == 21
    ref.close(torch.from_numpy(result._curves["sinks"])[:10], full_forward_nll(model, torch.cat([torch.tensor([0]), tokens]))[:10],
              tol=1e-4, what="before eviction")


# --------------------------------------------------------------------------------------------
# the exact parallel form (BandKVCache) against token-by-token decoding
# --------------------------------------------------------------------------------------------
PARALLEL_CASES = [  # (model fields, n_sink, window, order); the stream has 47 predictions
    (dict(attention="softmax"), 0, 7, "reference"),
    (dict(attention="softmax"), 1, 9, "evict-first"),
    (dict(attention="softmax"), 4, 60, "reference"),  # window larger than the stream: nothing evicted
    (dict(attention="sigmoid", qk_norm=True), 4, 6, "reference"),
    (dict(attention="sigmoid", attn_normalize=True), 1, 5, "evict-first"),
    (dict(attention="elu1"), 0, 8, "evict-first"),
    (dict(attention="elu1"), 4, 5, "reference"),
    (dict(attention="softmax", gate="elementwise", qk_norm=True), 4, 6, "reference"),
    (dict(attention="sigmoid", gate="headwise"), 1, 7, "reference"),
    (dict(attention="softmax", sink_logit="learned"), 1, 6, "reference"),
    (dict(attention="softmax", sink_logit="zero", n_kv_head=1), 4, 8, "evict-first"),
    (dict(attention="softmax", sink_tokens=2), 0, 6, "reference"),  # window mode keeps the sink tokens
    (dict(attention="elu1", sink_tokens=3), 4, 5, "evict-first"),
    (dict(attention="linear"), 4, 6, "reference"),  # the recurrent state, fed in chunks
]


@pytest.mark.parametrize("fields,n_sink,window,order", PARALLEL_CASES,
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v))
def test_parallel_form_equals_token_by_token(ref, fields, n_sink, window, order):
    """Per-token NLL of the parallel form (chunks of 10 queries, so chunks straddle the start of
    eviction) equals token-by-token decoding within 1e-5 in fp32, for every mode with a cache."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=V, **fields)
    model = ref.randomize_(GPT(cfg), seed=3).eval()  # peaked attention: evictions change the output
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks") or name == "sink_tokens":  # away from their zero init
                p.normal_(0, 1.0)
        model.norm.weight.mul_(0.2)  # NLL near a trained model's (~5 nats), not ~20: fp32 steps of ~1e-6
    tokens = torch.randint(0, V, (48,), generator=torch.Generator().manual_seed(1))
    modes = ("window", "sinks")
    fast = evaluate(model, tokens, n_sink, window, modes, order=order, chunk=10)
    exact = evaluate(model, tokens, n_sink, window, modes, order=order, exact_decode=True)
    assert fast.modes.keys() == exact.modes.keys()
    for mode in fast.modes:
        assert fast.modes[mode]["method"] in ("parallel", "chunked state")
        assert exact.modes[mode]["method"] == "exact-decode"
        diff = abs(fast._curves[mode] - exact._curves[mode]).max()
        assert diff < 1e-5, (mode, diff)
        assert fast.modes[mode]["cache_tokens_peak"] == exact.modes[mode]["cache_tokens_peak"]
    if cfg.attention != "linear" and fast.first_eviction < 32:  # evictions change the NLL: not a full forward
        full = full_forward_nll(model, tokens[:33]).numpy()
        sinks = fast._curves["sinks"]
        assert abs(sinks[fast.first_eviction : 32] - full[fast.first_eviction :]).max() > 1e-3
        assert n_sink == 0 or abs(sinks - fast._curves["window"]).max() > 1e-3


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create while the mode is on (CPU tensors have no
    allocator statistics): a storage counts from the op that makes it until its tensor is freed."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _release(self, key):
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                key = t.untyped_storage().data_ptr()
                self.live[key] = t.untyped_storage().nbytes()
                self.now += self.live[key]
                self.peak = max(self.peak, self.now)
                weakref.finalize(t, self._release, key)
        return out


def test_parallel_form_memory_is_bounded_as_the_stream_grows(ref):
    """Peak tensor memory of the parallel form is flat in the stream length (4x longer: < 1.3x),
    while a full cache fed the same chunks grows with it (> 2x): the measure sees growth."""
    model = tiny(ref)
    peaks = {}
    for n in (200, 800):
        tokens = torch.randint(0, V, (n,))
        for kind, make in (("band", lambda: model.make_cache(2, 16, band=True)), ("full", model.make_cache)):
            with LiveTensorBytes() as meter:
                stream_nll(model, tokens, make(), chunk=32)
            peaks[kind, n] = meter.peak
    assert peaks["band", 800] < 1.3 * peaks["band", 200], peaks
    assert peaks["full", 800] > 2 * peaks["full", 200], peaks


def test_plain_sink_cache_refuses_chunks(ref):
    model = tiny(ref)
    with pytest.raises(ValueError, match="band=True"):
        stream_nll(model, torch.randint(0, V, (20,)), model.make_cache(2, 4), chunk=4)


def test_long_stream_starts_the_split_again():
    val = np.arange(50)
    tokens, text = long_stream(val, 120, keys_per_query=10)
    assert tokens.tolist() == (list(range(50)) * 3)[:120] and "2.40 times" in text
    tokens, text = long_stream(val, 30, keys_per_query=10)
    assert tokens.tolist() == list(range(30)) and "first 30 tokens" in text
    with pytest.raises(ValueError, match="would see the repeat"):
        long_stream(val, 120, keys_per_query=50)


def test_nll_by_position_has_bounded_resolution():
    edges, scale = position_bins(10**6, 256)
    assert scale == "log" and len(edges) <= MAX_BINS + 1 and edges[0] == 0 and edges[-1] == 10**6
    assert (np.diff(edges) > 0).all()
    edges, scale = position_bins(5000, 256)
    assert scale == "linear" and len(edges) == MAX_BINS + 1 and (np.diff(edges) == 5).all()
    rng = np.random.default_rng(0)
    curves = {"sinks": rng.random(5000), "recompute": rng.random(5000)}
    curves["recompute"][1::2] = np.nan  # a stride-2 recompute
    binned = binned_nll(curves, 5000, 256)
    assert binned["nll"]["sinks"][3] == pytest.approx(curves["sinks"][15:20].mean())
    assert binned["nll"]["recompute"][3] == pytest.approx(curves["recompute"][16:20:2].mean())
    diff = curves["sinks"][16:20:2] - curves["recompute"][16:20:2]
    assert binned["baseline"] == "recompute" and binned["minus_baseline"]["sinks"][3] == pytest.approx(diff.mean())
    without = binned_nll({"window": curves["sinks"] + 1, "sinks": curves["sinks"]}, 5000, 256)
    assert without["baseline"] == "sinks" and without["minus_baseline"]["window"] == pytest.approx([1.0] * MAX_BINS)
    assert "minus_baseline" not in binned_nll({"sinks": curves["sinks"]}, 5000, 256)
