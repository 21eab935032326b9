"""The attention block (model/attention.py) against the independent reference in conftest.py.

Every attention kind x output gate, plus attn_normalize, qk_norm, GQA and an explicit
sigmoid_bias, for the `math` backend (materialised weights) and the default `auto` backend
(sdpa for softmax, chunked for linear), forward and gradients, causal and bidirectional.
Also: the three forms of linear attention (quadratic, chunked, recurrent) agree.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from model import Attention, AttentionConfig
from model.backends import resolve
from model.cache import LinearState

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = ("softmax", "sigmoid", "elu1", "linear", "softpick")
GATES = ("none", "headwise", "elementwise")
T = 13  # deliberately not a multiple of the linear chunk size used below


def _cases():
    cases = []
    for i, kind in enumerate(KINDS):
        for j, gate in enumerate(GATES):
            cases.append(dict(attention=kind, gate=gate, qk_norm=(i + j) % 2 == 1))
    for kind in ("sigmoid", "elu1"):
        for gate in ("none", "elementwise"):
            cases.append(dict(attention=kind, gate=gate, attn_normalize=True, qk_norm=gate == "none"))
    for kind in KINDS:  # grouped-query attention: 4 query heads share 2 kv heads
        cases.append(dict(attention=kind, gate="headwise", n_head=4, n_kv_head=2, qk_norm=kind == "sigmoid"))
    cases.append(dict(attention="sigmoid", gate="none", sigmoid_bias=-1.5))
    return cases


CASES = _cases()


def _id(c):
    parts = [c["attention"], c["gate"]]
    if c.get("attn_normalize"):
        parts.append("norm")
    if c.get("qk_norm"):
        parts.append("qknorm")
    if c.get("n_kv_head"):
        parts.append(f"gqa{c['n_head']}-{c['n_kv_head']}")
    if c.get("sigmoid_bias") is not None:
        parts.append(f"bias{c['sigmoid_bias']}")
    return "-".join(parts)


def make_cfg(**kw) -> AttentionConfig:
    base = dict(n_embd=32, n_head=2, block_size=64, linear_chunk_size=4)
    base.update(kw)
    return AttentionConfig(**base)


def make_attn(ref, cfg, causal=True, seed=0) -> Attention:
    return ref.randomize_(Attention(cfg, causal=causal).double(), seed)


def _forward_and_grads(module_fn, params, x, gy):
    y = module_fn(x)
    grads = torch.autograd.grad(y, [x, *params], gy)
    return y, grads


@pytest.mark.parametrize("backend", ["math", "auto"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_attention_forward_and_grads_match_reference(ref, case, causal, backend):
    cfg = make_cfg(backend=backend, **case)
    attn = make_attn(ref, cfg, causal=causal)
    if backend == "auto":  # make sure `auto` really exercises the fast path on CPU
        expected = {"softmax": "sdpa", "linear": "chunked"}.get(cfg.attention, "math")
        assert resolve(cfg, torch.device("cpu")) == expected
        assert attn.backend == expected  # resolved once, when the block was built
    names, params = zip(*attn.named_parameters())
    if cfg.gate != "none":
        assert "g_proj.weight" in names
        assert attn.g_proj.weight.shape == (cfg.n_head if cfg.gate == "headwise" else cfg.n_embd, cfg.n_embd)
    else:
        assert "g_proj.weight" not in names
    assert ("q_norm.weight" in names) == cfg.qk_norm
    assert attn.k_proj.weight.shape == (cfg.kv_heads * cfg.head_dim, cfg.n_embd)

    x = torch.randn(2, T, cfg.n_embd, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, T, cfg.n_embd, dtype=torch.float64)

    y, grads = _forward_and_grads(lambda inp: attn(inp)[0], params, x, gy)
    P = ref.attn_params(attn)
    y_ref, grads_ref = _forward_and_grads(lambda inp: ref.attention(inp, P, cfg, causal=causal)[0], params, x, gy)

    assert y.shape == (2, T, cfg.n_embd)
    ref.close(y, y_ref, what="output")
    for name, g, g_ref in zip(("input", *names), grads, grads_ref):
        ref.close(g, g_ref, what=f"grad of {name}")


@pytest.mark.parametrize("case", [c for c in CASES if not c.get("n_kv_head")], ids=_id)
def test_attention_is_causal(ref, case):
    """Perturbing inputs after position t leaves outputs at <= t unchanged (fast path)."""
    cfg = make_cfg(**case)
    attn = make_attn(ref, cfg)
    x = torch.randn(1, T, cfg.n_embd, dtype=torch.float64)
    t = 6
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
    with torch.no_grad():
        y, y2 = attn(x)[0], attn(x2)[0]
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1], rtol=1e-9, atol=1e-10)
    assert (y[:, t + 1 :] - y2[:, t + 1 :]).abs().max() > 1e-3  # later positions do change


def test_bidirectional_sees_the_future(ref):
    cfg = make_cfg(attention="softmax")
    attn = make_attn(ref, cfg, causal=False)
    x = torch.randn(1, T, cfg.n_embd, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert (attn(x)[0][:, 0] - attn(x2)[0][:, 0]).abs().max() > 1e-4


# softpick rows may have zero mass (sum to 0, not 1): its weights are tested in test_softpick.py
@pytest.mark.parametrize("case", [c for c in CASES if not c.get("qk_norm")][:6]
                         + [c for c in CASES if c["attention"] != "softpick"][-2:], ids=_id)
def test_attention_weights_returned_by_the_module(ref, case):
    """return_attn: probs = w / sum(w) (zero above the diagonal, rows sum to 1), mass = sum(w)."""
    cfg = make_cfg(**case)
    attn = make_attn(ref, cfg)
    x = torch.randn(2, T, cfg.n_embd, dtype=torch.float64)
    with torch.no_grad():
        y, weights = attn(x, return_attn=True)
        y_plain, none = attn(x)
        y_ref, w_ref, _ = ref.attention(x, ref.attn_params(attn), cfg)
    assert none is None
    ref.close(y, y_ref, what="output")
    ref.close(y, y_plain, what="output with / without return_attn")
    H = cfg.n_head
    assert weights.probs.shape == (2, H, T, T) and weights.mass.shape == (2, H, T)
    upper = ~torch.tril(torch.ones(T, T, dtype=torch.bool))
    assert (weights.probs[..., upper] == 0).all()
    ref.close(weights.probs.sum(-1), torch.ones(2, H, T, dtype=torch.float64), 1e-12, "row sums")
    ref.close(weights.probs, w_ref / w_ref.sum(-1, keepdim=True), what="probs")
    if cfg.attention in ("softmax", "linear") or cfg.attn_normalize:
        expected_mass = torch.ones(2, H, T, dtype=torch.float64)
    else:
        expected_mass = w_ref.sum(-1)
        assert (expected_mass - 1).abs().max() > 1e-2  # the check below is not vacuous
    ref.close(weights.mass, expected_mass, what="mass")


# --------------------------------------------------------------------------------------------
# linear attention: quadratic (math), chunked and recurrent forms agree
# --------------------------------------------------------------------------------------------
LINEAR_CASES = [
    dict(gate="none"),
    dict(gate="elementwise", qk_norm=True),
    dict(gate="headwise", n_head=4, n_kv_head=2),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: _id(dict(attention="linear", **c)))
def test_linear_chunked_and_recurrent_forms_agree(ref, case):
    T_lin = 17
    base = make_cfg(attention="linear", backend="math", **case)
    quad = make_attn(ref, base)
    sd = quad.state_dict()
    x = torch.randn(2, T_lin, base.n_embd, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, T_lin, base.n_embd, dtype=torch.float64)
    y_quad, (gx_quad,) = _forward_and_grads(lambda inp: quad(inp)[0], [], x, gy)
    y_ref = ref.attention(x, ref.attn_params(quad), base)[0]
    ref.close(y_quad, y_ref, what="quadratic vs reference")

    for chunk in (1, 2, 3, 5, 8, 16, 17, 64):  # includes sizes that do not divide T
        cfg = replace(base, backend="chunked", linear_chunk_size=chunk)
        attn = Attention(cfg).double()
        attn.load_state_dict(sd)
        params = list(attn.parameters())
        y, (gx, *gp) = _forward_and_grads(lambda inp: attn(inp)[0], params, x, gy)
        # the three forms compute the same float64 math: agree to ~1e-12
        ref.close(y, y_quad, 1e-10, f"chunk {chunk}")
        for g in gp:
            assert torch.isfinite(g).all(), f"chunk {chunk}: non-finite parameter gradient"
        ref.close(gx, gx_quad, 1e-10, f"chunk {chunk}: input grad")

    # recurrent state: token by token, and in pieces of uneven sizes, with chunk sizes 1 and 4
    with torch.no_grad():
        for chunk in (1, 4):
            attn = Attention(replace(base, backend="auto", linear_chunk_size=chunk)).double()
            attn.load_state_dict(sd)
            state = LinearState()
            steps = [attn(x[:, t : t + 1], cache=state)[0] for t in range(T_lin)]
            assert len(state) == T_lin
            ref.close(torch.cat(steps, 1), y_quad, 1e-10, f"recurrent, token by token (chunk {chunk})")
            state, outs, start = LinearState(), [], 0
            for n in (5, 1, 3, 6, 2):
                outs.append(attn(x[:, start : start + n], cache=state)[0])
                start += n
            ref.close(torch.cat(outs, 1), y_quad, 1e-10, f"recurrent, uneven pieces (chunk {chunk})")


def test_linear_bidirectional_global_form(ref):
    """Non-causal linear attention (ViT) is the global kernel form, equal to the masked-free
    quadratic form for both backends."""
    cfg = make_cfg(attention="linear", backend="math")
    a_math = make_attn(ref, cfg, causal=False)
    a_auto = Attention(replace(cfg, backend="auto"), causal=False).double()
    a_auto.load_state_dict(a_math.state_dict())
    x = torch.randn(2, T, cfg.n_embd, dtype=torch.float64)
    with torch.no_grad():
        y_ref = ref.attention(x, ref.attn_params(a_math), cfg, causal=False)[0]
        ref.close(a_math(x)[0], y_ref, what="math")
        ref.close(a_auto(x)[0], y_ref, what="auto (global)")


def test_reference_rope_is_rotate_half(ref):
    """Sanity check of the reference itself on a hand-computable case: D=4, position 1,
    theta=100: pairs (x0, x2) and (x1, x3) rotate by 1 and 1/10 radians."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    out = ref.rope(x, torch.tensor([1]), 100.0).view(4)
    a0, a1 = 1.0, 0.1
    expect = torch.tensor([
        1 * math.cos(a0) - 3 * math.sin(a0),
        2 * math.cos(a1) - 4 * math.sin(a1),
        3 * math.cos(a0) + 1 * math.sin(a0),
        4 * math.cos(a1) + 2 * math.sin(a1),
    ], dtype=torch.float64)
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)


# DeepSpeed's bf16 mode casts the whole module: RoPE frequencies must not be rounded with it.
def test_rope_frequencies_survive_a_bf16_module_cast(ref):
    cfg = make_cfg(n_embd=64, n_head=2, block_size=256)
    x = torch.randn(1, 2, 256, 32, generator=torch.Generator().manual_seed(0))
    want = ref.rope(x.transpose(1, 2).double(), torch.arange(256), cfg.rope_theta).transpose(1, 2)
    attn = Attention(cfg)
    rounding_only = (attn.rope(x.bfloat16(), 0).double() - want).abs().max().item()  # ~0.025
    attn.to(torch.bfloat16)
    err = (attn.rope(x.bfloat16(), 0).double() - want).abs().max().item()  # ~0.12 if inv_freq were cast
    assert err <= 2 * rounding_only, f"bf16-cast module: RoPE error {err:.3f} vs {rounding_only:.3f} from bf16 rounding"


# --------------------------------------------------------------------------------------------
# the backend is resolved once, when the block is built or moved, and described
# --------------------------------------------------------------------------------------------
def test_backend_is_resolved_at_build_and_move_not_per_forward(monkeypatch):
    from model import backends

    attn = Attention(make_cfg(attention="softmax"))
    assert attn.backend == "sdpa" and attn.backend_description == "sdpa (softmax, fp32, cpu)"
    attn.double()  # a cast resolves again for the new dtype
    assert attn.backend_description == "sdpa (softmax, fp64, cpu)"
    assert attn.set_backend("cpu", torch.bfloat16) == "sdpa (softmax, bf16, cpu)"
    attn.float()  # the pinned compute dtype (mixed precision) survives later moves
    assert attn.backend_description == "sdpa (softmax, bf16, cpu)"

    def no_resolving(*args):
        raise AssertionError("resolved during a forward")

    monkeypatch.setattr(backends, "resolve", no_resolving)
    with torch.no_grad():
        attn(torch.randn(1, T, 32))


def test_explicit_backend_that_cannot_run_here_fails_with_its_reason():
    from model import backends

    with pytest.raises(ValueError, match=r"backend=flex has no backward on cpu.*backend=auto"):
        backends.check(make_cfg(attention="sigmoid", backend="flex"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"backend=flash .*(flash-attn|CUDA)"):  # no package, or not on the CPU
        backends.check(make_cfg(attention="softmax", backend="flash"), torch.device("cpu"), "bf16")
    backends.check(make_cfg(attention="sigmoid", backend="math"), torch.device("cpu"))  # fine


# --------------------------------------------------------------------------------------------
# sink_logit: a per-head logit in softmax's denominator (zero = softmax + 1, learned = gpt-oss sinks)
# --------------------------------------------------------------------------------------------
SINK_CASES = [
    dict(attention="softmax", gate="none", sink_logit="zero"),
    dict(attention="softmax", gate="none", sink_logit="learned"),
    dict(attention="softmax", gate="elementwise", sink_logit="learned", qk_norm=True),
    dict(attention="softmax", gate="headwise", sink_logit="learned", n_head=4, n_kv_head=2),
]


def _sink_id(c):
    return f"{_id(c)}-sink_{c['sink_logit']}"


@pytest.mark.parametrize("backend", ["math", "auto"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", SINK_CASES, ids=_sink_id)
def test_sink_logit_forward_and_grads_match_reference(ref, case, causal, backend):
    test_attention_forward_and_grads_match_reference(ref, case, causal, backend)
    attn = make_attn(ref, make_cfg(**case))
    names = [n for n, _ in attn.named_parameters() if "sink" in n]
    if case["sink_logit"] == "learned":
        assert names == ["sinks"] and attn.sinks.shape == (attn.cfg.n_head,)
        assert (Attention(make_cfg(**case)).sinks == 0).all()  # initialised at 0.0
    else:
        assert names == []


@pytest.mark.parametrize("case", SINK_CASES, ids=_sink_id)
def test_sink_logit_is_causal(ref, case):
    test_attention_is_causal(ref, case)


def test_learned_sinks_at_zero_equal_softmax_plus_one(ref):
    learned = make_attn(ref, make_cfg(sink_logit="learned"))
    with torch.no_grad():
        learned.sinks.zero_()
    zero = Attention(make_cfg(sink_logit="zero")).double()
    zero.load_state_dict({k: v for k, v in learned.state_dict().items() if k != "sinks"})
    plain = Attention(make_cfg()).double()
    plain.load_state_dict(zero.state_dict())
    x = torch.randn(2, T, 32, dtype=torch.float64)
    with torch.no_grad():
        ref.close(learned(x)[0], zero(x)[0], 1e-12, "learned b=0 vs zero")
        assert (zero(x)[0] - plain(x)[0]).abs().max() > 1e-2  # the extra 1 in the denominator is felt


@pytest.mark.parametrize("case", SINK_CASES[1:3], ids=_sink_id)
def test_sink_logit_weights_report_the_virtual_slot(ref, case):
    """return_attn: mass = sum_j w_ij < 1, and the virtual key's weight sink_slot = 1 - mass."""
    cfg = make_cfg(**case)
    attn = make_attn(ref, cfg)
    x = torch.randn(2, T, cfg.n_embd, dtype=torch.float64)
    with torch.no_grad():
        y, weights = attn(x, return_attn=True)
        y_ref, w_ref, _ = ref.attention(x, ref.attn_params(attn), cfg)
    ref.close(y, y_ref, what="output")
    ref.close(weights.mass, w_ref.sum(-1), what="mass")
    # exp(b) / (exp(b) + sum_j exp(s_ij)) = 1 - sum_j w_ij for the reference's w
    ref.close(weights.sink_slot, 1 - w_ref.sum(-1), what="sink slot")
    assert weights.sink_slot.mean() > 0.1  # the virtual key takes a real share here
    ref.close(weights.probs.sum(-1), torch.ones_like(weights.mass), 1e-12, "probs row sums")


def test_sink_logit_needs_softmax_and_a_backend_that_has_it():
    for kind in ("sigmoid", "elu1", "linear"):
        with pytest.raises(ValueError, match=rf"model.sink_logit=learned .*attention=softmax only.*{kind}"):
            make_cfg(attention=kind, sink_logit="learned").validate()
    with pytest.raises(ValueError, match="model.sink_logit='sometimes' is not one of"):
        make_cfg(sink_logit="sometimes").validate()
    from model import backends

    assert "no sink logit" in backends.get("flash").why_not(make_cfg(sink_logit="zero"))
    assert backends.resolve(make_cfg(sink_logit="learned"), torch.device("cuda"), torch.bfloat16) == "sdpa"
