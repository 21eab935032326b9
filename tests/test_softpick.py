"""Softpick attention (Zuhri et al. 2025) against its formula computed directly:
w_ij = relu(e^{s_ij} - 1) / (sum_j |e^{s_ij} - 1| + eps) over the visible keys.

The stable form (row max factored out) equals the formula and stays finite where e^s overflows;
the flex forward equals math; the block's weights and row mass; cached decoding equals the full
forward; the exact parallel streaming form equals token-by-token decoding; the sink metrics
read the proxy w / sum(w) and a row of zero mass as attending to nothing."""
from __future__ import annotations

import pytest
import torch

from eval.sink import evaluate as sink_evaluate
from eval.streaming import evaluate as stream_evaluate
from model import GPT, Attention, AttentionConfig, GPTConfig
from model import backends
from model.scores import math_attention, softpick

pytestmark = pytest.mark.usefixtures("single_thread")
V = 64


def direct(s: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The formula as written, in float64: no max subtracted."""
    e = torch.expm1(s.double()) * mask
    return e.clamp_min(0) / (e.abs().sum(-1, keepdim=True) + eps)


def test_softpick_equals_the_formula_and_zeroes_non_positive_scores():
    g = torch.Generator().manual_seed(0)
    s = 3 * torch.randn(3, 2, 9, 9, generator=g, dtype=torch.float64)
    s[0, 0, 4] = -torch.rand(9, generator=g, dtype=torch.float64)  # every score <= 0: attends to nothing
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    w = softpick(s, mask)
    torch.testing.assert_close(w, direct(s, mask), rtol=1e-12, atol=1e-15)
    assert (w[~mask.expand_as(w)] == 0).all() and (w[s <= 0] == 0).all()
    assert (w[0, 0, 4] == 0).all()
    sums = w.sum(-1)
    assert (sums <= 1 + 1e-12).all() and (sums < 0.99).any()  # rows sum to at most 1, not always 1


def test_softpick_is_finite_where_the_plain_formula_overflows():
    s = torch.tensor([[100.0, 99.0, -3.0, 0.5]])  # e^100 overflows fp32
    assert not torch.isfinite(torch.expm1(s)).all()
    w = softpick(s)
    assert torch.isfinite(w).all()
    expected = direct(s, torch.ones_like(s, dtype=torch.bool))  # float64 holds e^100
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=1e-12)
    # gradients flow and are finite, also with masked keys
    s = (5 * torch.randn(2, 6, 6, dtype=torch.float64)).requires_grad_()
    torch.autograd.gradcheck(lambda x: softpick(x, torch.ones(6, 6, dtype=torch.bool).tril()), (s,))


def test_softpick_very_negative_row_gives_zero_not_nan():
    s = torch.full((1, 5), -200.0)  # e^{-m} would overflow with m = max(s) = -200
    assert (softpick(s) == 0).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_flex_forward_matches_math(causal):
    cfg = AttentionConfig(n_embd=64, n_head=4, attention="softpick")
    g = torch.Generator().manual_seed(1)
    q, k, v = (3 * torch.randn(2, 4, 40, 16, generator=g) for _ in range(3))
    q[0, 0, 5] = -k[0, 0, :6].sum(0)  # a query whose row may be all <= 0 (zero output, no NaN)
    with torch.no_grad():
        y = backends.get("flex")(q, k, v, cfg, causal)
        ref = math_attention(q, k, v, cfg, causal)[0]
    assert torch.isfinite(y).all()
    assert (y - ref).norm() / ref.norm() < 1e-5


def test_backends_without_softpick_refuse_it_in_one_line():
    for name in ("sdpa", "chunked"):
        with pytest.raises(ValueError, match=f"model.backend={name!r} cannot run attention='softpick'"):
            backends.check_name(AttentionConfig(attention="softpick", backend=name))
    backends.check_name(AttentionConfig(attention="softpick", backend="flex"))  # flex runs it
    assert backends.resolve(AttentionConfig(attention="softpick"), torch.device("cpu")) == "math"


def test_block_weights_and_mass(ref):
    cfg = AttentionConfig(n_embd=32, n_head=2, block_size=64, attention="softpick")
    attn = ref.randomize_(Attention(cfg).double(), 0)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        y, weights = attn(x, return_attn=True)
        y_ref, w_ref, _ = ref.attention(x, ref.attn_params(attn), cfg)
    ref.close(y, y_ref, what="output")
    ref.close(weights.mass, w_ref.sum(-1), what="mass")
    mass = w_ref.sum(-1, keepdim=True)
    proxy = torch.where(mass > 0, w_ref / mass.clamp_min(1e-300), 0.0)
    ref.close(weights.probs, proxy, what="proxy w / sum(w)")
    assert (weights.mass - 1).abs().max() > 1e-2  # rows do not sum to 1: the proxy is not vacuous


def softpick_gpt(ref, seed=0, **kw):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=V, attention="softpick", **kw)
    return ref.randomize_(GPT(cfg), seed).eval()


def test_cached_decoding_equals_full_forward(ref):
    model = softpick_gpt(ref)
    idx = torch.randint(0, V, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx).logits
        cache, pieces, start = model.make_cache(), [], 0
        for n in (5, 3) + (1,) * 7:
            pieces.append(model(idx[:, start : start + n], cache=cache).logits)
            start += n
    ref.close(torch.cat(pieces, 1), full, what="cached logits")


@pytest.mark.parametrize("n_sink,window,order", [(4, 6, "reference"), (0, 7, "evict-first"), (1, 9, "evict-first")])
def test_parallel_streaming_equals_token_by_token(ref, n_sink, window, order):
    model = softpick_gpt(ref, seed=3)
    with torch.no_grad():
        model.norm.weight.mul_(0.2)  # NLL near a trained model's: fp32 steps of ~1e-6
    tokens = torch.randint(0, V, (48,), generator=torch.Generator().manual_seed(1))
    fast = stream_evaluate(model, tokens, n_sink, window, ("window", "sinks"), order=order, chunk=10)
    exact = stream_evaluate(model, tokens, n_sink, window, ("window", "sinks"), order=order, exact_decode=True)
    for mode in fast.modes:
        assert fast.modes[mode]["method"] == "parallel" and exact.modes[mode]["method"] == "exact-decode"
        assert abs(fast._curves[mode] - exact._curves[mode]).max() < 1e-5, mode


def test_sink_1_reads_the_proxy_of_the_applied_weights(ref):
    """eval.sink's Sink_1 on a softpick model equals Gu et al.'s rate computed here from the
    block's weights: per sequence and (layer, head), alpha_1 = mean over queries of w_i0 / sum_j w_ij
    (0 for a row of zero mass), share of pairs above eps = 0.3, mean over sequences."""
    model = softpick_gpt(ref)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(3.0)  # sharper scores: some heads cross eps
    rows = torch.randint(0, V, (6, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(rows, return_attn=True)
    alphas = []
    for probs, mass in zip(out.attn, out.attn_mass):
        w = probs * mass.unsqueeze(-1)  # the weights applied to the values
        s = w.sum(-1, keepdim=True)
        proxy = torch.where(s > 0, w / s.clamp_min(1e-30), 0.0)
        alphas.append(proxy[..., :, 0].mean(-1))  # (B, H)
    alpha = torch.stack(alphas, 1)  # (B, L, H)
    expected = float((alpha > 0.3).float().mean(dim=(1, 2)).mean() * 100)
    res = sink_evaluate(model, rows, [16])
    assert res.sink_1 == pytest.approx(expected, abs=1e-9)
    assert 0 < expected < 100  # not a vacuous 0 or 100
