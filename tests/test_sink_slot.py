"""model.sink_value: the learned sink slot with a value, y_i = (sum_j e^{s_ij} v_j + e^{b_h} v_h) / (e^{b_h} +
sum_j e^{s_ij}), against the independent reference of conftest.py (forward and gradients, every backend that runs
sink logits here), the fused paths' closed form, the KV caches and the exact parallel streaming form."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eval.streaming import evaluate
from model import GPT, GPTConfig
from model.attention import Attention
from model.config import AttentionConfig
from model.scores import math_attention, sink_rescale

T = 12
SLOT_CASES = [
    dict(n_head=2),
    dict(n_head=4, n_kv_head=2, gate="headwise"),  # grouped: each kv head's value serves its query heads
    dict(n_head=4, n_kv_head=1, gate="elementwise", qk_norm=True),
]


def slot_cfg(**kw) -> AttentionConfig:
    base = dict(n_embd=32, block_size=T, attention="softmax", sink_logit="learned", sink_value=True)
    return AttentionConfig(**{**base, **kw})


@pytest.mark.parametrize("backend", ["math", "auto"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", SLOT_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_slot_forward_and_grads_match_reference(ref, case, causal, backend):
    cfg = slot_cfg(backend=backend, **case)
    attn = ref.randomize_(Attention(cfg, causal=causal).double(), seed=1)
    assert attn.sink_values.shape == (cfg.kv_heads, cfg.head_dim)
    assert attn.backend == ("sdpa" if backend == "auto" else "math")
    names, params = zip(*attn.named_parameters())
    x = torch.randn(2, T, cfg.n_embd, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, T, cfg.n_embd, dtype=torch.float64)
    y = attn(x)[0]
    grads = torch.autograd.grad(y, [x, *params], gy)
    P = ref.attn_params(attn)
    y_ref = ref.attention(x, P, cfg, causal=causal)[0]
    grads_ref = torch.autograd.grad(y_ref, [x, *params], gy)
    ref.close(y, y_ref, what="output")
    for name, g, g_ref in zip(("input", *names), grads, grads_ref):
        ref.close(g, g_ref, what=f"grad of {name}")
    assert grads[names.index("sink_values") + 1].abs().max() > 1e-3  # the value trains


def test_fused_form_is_the_rescale_plus_the_slot(ref):
    """What sdpa and flex compute, y * sigmoid(lse - b) + v_h * sigmoid(b - lse), equals the materialised
    weights with the slot as one more key (math), and the slot's value really enters the output."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    b, value = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    cfg = slot_cfg(n_embd=24, n_head=3)
    s = (q @ k.transpose(-2, -1)) / 8 ** 0.5
    s = s.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    y_soft = torch.softmax(s, -1) @ v
    fused = sink_rescale(y_soft, s.logsumexp(-1), b, value)
    y_math, w = math_attention(q, k, v, cfg, causal=True, sink=b, sink_value=value)
    # by hand: the slot as a key column with logit b_h and value v_h
    s_slot = torch.cat((s, b[None, :, None, None].expand(2, 3, 9, 1)), -1)
    p = torch.softmax(s_slot, -1)
    by_hand = p[..., :-1] @ v + p[..., -1:] * value[None, :, None, :]
    ref.close(y_math, by_hand, 1e-12, "math")
    ref.close(fused, by_hand, 1e-12, "fused closed form")
    ref.close(w.sum(-1), 1 - p[..., -1], 1e-12, "row mass")
    assert (by_hand - math_attention(q, k, v, cfg, True, sink=b)[0]).abs().max() > 1e-2


def slot_model(ref, n_kv_head=1, seed=3) -> GPT:
    cfg = GPTConfig(n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=32, block_size=32, vocab_size=64,
                    sink_logit="learned", sink_value=True)
    model = ref.randomize_(GPT(cfg), seed=seed).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(1.0, 1.0)  # the slot takes a real share
            elif name.endswith("sink_values"):
                p.normal_(0, 1.0)
        model.norm.weight.mul_(0.2)
    return model


def test_kv_cache_decoding_equals_the_full_forward(ref):
    model = slot_model(ref)
    tokens = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.make_cache()
        steps = torch.cat([model(tokens[:, i : i + 1], cache=cache).logits for i in range(20)], dim=1)
    ref.close(steps, full, 1e-5, "decoded vs full")


@pytest.mark.parametrize("n_sink,window,order", [(0, 6, "reference"), (4, 5, "evict-first"), (1, 40, "reference")])
def test_parallel_streaming_equals_token_by_token(ref, n_sink, window, order):
    """The slot is never evicted: window-only and sink caches, parallel form vs token-by-token decoding."""
    model = slot_model(ref, n_kv_head=2)
    tokens = torch.randint(0, 64, (48,), generator=torch.Generator().manual_seed(1))
    fast = evaluate(model, tokens, n_sink, window, ("window", "sinks"), order=order, chunk=10)
    exact = evaluate(model, tokens, n_sink, window, ("window", "sinks"), order=order, exact_decode=True)
    for mode in fast.modes:
        assert abs(fast._curves[mode] - exact._curves[mode]).max() < 1e-5, mode


def test_a_zero_value_is_the_sink_logit_alone_and_the_value_matters(ref):
    model = slot_model(ref)
    plain_cfg = GPTConfig(**{**model.config.__dict__, "sink_value": False})
    plain = GPT(plain_cfg).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "sink_values" not in k})
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with_value = model(tokens).logits
        for name, p in model.named_parameters():
            if name.endswith("sink_values"):
                p.zero_()
        ref.close(model(tokens).logits, plain(tokens).logits, 1e-6, "v_h = 0 vs sink_logit alone")
    assert (with_value - plain(tokens).logits).abs().max() > 1e-2


def test_config_and_export_refusals(tmp_path):
    with pytest.raises(ValueError, match="sink_value=true .* needs model.sink_logit=learned"):
        AttentionConfig(sink_logit="zero", sink_value=True).validate()
    from runs.export_hf import unsupported

    assert any("sink_value" in r for r in unsupported({"attention": "softmax", "sink_logit": "learned",
                                                        "sink_value": True}))


def test_retrofit_starts_the_slot_at_zero():
    from model.interop.retrofit import added_fields, complete_state

    cfg = GPTConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, vocab_size=64, sink_logit="learned",
                    sink_value=True, sink_logit_init=-30.0)
    assert added_fields(cfg, GPTConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, vocab_size=64)) == {
        "sink_logit": "learned", "sink_value": True}
    state = {k: v for k, v in GPT(cfg).state_dict().items() if "sink" not in k}
    done = complete_state(state, cfg, [])
    assert done["layers.0.self_attn.sink_values"].shape == (2, 8) and not done["layers.0.self_attn.sink_values"].any()
    model = GPT(cfg).eval()
    model.load_state_dict(done)
    tokens = torch.randint(0, 64, (1, 10))
    plain = GPT(GPTConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, vocab_size=64)).eval()
    plain.load_state_dict(state)
    with torch.no_grad():
        assert F.mse_loss(model(tokens).logits, plain(tokens).logits) < 1e-12  # b = -30: the import's function
