"""Metric definitions of eval/sink.py, eval/spikes.py and eval/activations.py against
hand-built inputs with known answers (fast, CPU)."""
import json
import math

import numpy as np
import pytest
import torch

from eval import activations, sink, spikes
from probes.sink import measure


def uniform_causal(T: int, L: int = 2, H: int = 3) -> torch.Tensor:
    """A_ij = 1/i for j <= i (1-indexed): every query spreads evenly over what it can see."""
    A = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).unsqueeze(1)
    return A.expand(L, H, T, T).clone()


def first_token_sink(T: int, L: int = 2, H: int = 3) -> torch.Tensor:
    A = torch.zeros(L, H, T, T)
    A[..., 0] = 1.0
    return A


# --- sink ------------------------------------------------------------------------------------

def test_all_mass_on_first_token():
    A = first_token_sink(16)
    assert torch.allclose(sink.importance(A, k=1), torch.ones(2, 3))
    per_layer, overall = sink.first_token_attention(A)
    assert per_layer == pytest.approx([1.0, 1.0]) and overall == pytest.approx(1.0)
    assert sink.sink_rate(sink.importance(A)) == pytest.approx(100.0)


@pytest.mark.parametrize("T", [8, 64])
def test_uniform_causal_closed_form(T):
    A = uniform_causal(T)
    alpha1 = sum(1 / i for i in range(1, T + 1)) / T
    alpha2 = sum(1 / i for i in range(2, T + 1)) / (T - 1)
    assert torch.allclose(sink.importance(A, k=1), torch.full((2, 3), alpha1), atol=1e-6)
    assert torch.allclose(sink.importance(A, k=2), torch.full((2, 3), alpha2), atol=1e-6)
    # F-Attn averages over all queries (query 0 included), so it equals alpha_1 here
    assert sink.first_token_attention(A)[1] == pytest.approx(alpha1, abs=1e-6)


def test_importance_list_of_batches_averages_over_batch():
    T = 10
    sinky, uniform = first_token_sink(T, L=1, H=2)[0], uniform_causal(T, L=1, H=2)[0]
    attn = [torch.stack([sinky, uniform])]  # one layer, (B=2, H, T, T)
    expected = (1.0 + sum(1 / i for i in range(1, T + 1)) / T) / 2
    assert torch.allclose(sink.importance(attn), torch.full((1, 2), expected), atol=1e-6)


def test_sink_rate_counts_strictly_above_eps():
    alpha = torch.tensor([[0.9, 0.1, 0.3], [0.31, 0.0, 0.29]])
    assert sink.sink_rate(alpha, eps=0.3) == pytest.approx(100 * 2 / 6)
    assert sink.sink_rate(alpha, eps=0.05) == pytest.approx(100 * 5 / 6)


def test_evaluate_on_tiny_model():
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, block_size=16))
    seqs = torch.randint(0, 50, (5, 16))
    res = sink.evaluate(model, seqs, lengths=(8, "block"), eps=0.3, batch_size=2)
    assert res.lengths == [8, 16] and res.headline_T == 8 and res.n_seqs == 5
    for T, r in res.by_length.items():
        alpha = torch.tensor(r["alpha_1"])
        assert alpha.shape == (2, 4)
        assert r["sink_1"] == pytest.approx(sink.sink_rate(alpha, 0.3))
        # with k=1, F-Attn of a layer is the head-mean of alpha_1
        assert r["f_attn_per_layer"] == pytest.approx(alpha.mean(1).tolist(), abs=1e-5)
    assert "proxy" in res.notes and "definitions" in res.to_json()


# --- spikes ----------------------------------------------------------------------------------

def noisy_series(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return 3.0 + 0.5 * np.exp(-np.arange(n) / 300) + rng.normal(0, 0.01, n)


def test_detects_exactly_the_planted_spikes():
    v = noisy_series()
    planted = [300, 500, 501, 800]
    v[planted] += 1.0
    assert spikes.detect_spikes(v, window=128, k=6) == planted
    assert spikes.merge_events(planted) == [(300, 300), (500, 501), (800, 800)]


def test_spikes_inside_the_first_window_are_not_eligible():
    v = noisy_series()
    v[50] += 1.0
    assert spikes.detect_spikes(v, window=128, k=6) == []
    assert spikes.n_eligible(v, window=128) == len(v) - 128


def test_no_spikes_on_smooth_decreasing_curve():
    steps = np.arange(2000)
    v = 2.0 + 8.0 * np.exp(-steps / 400)
    assert spikes.detect_spikes(v, window=128, k=6) == []
    rep = spikes.spike_report(steps, v, window=128, k=6)
    assert rep["spike_score"] == 0.0 and rep["events"] == [] and rep["divergence"] is None


def test_divergence_and_nan_excluded_from_statistics():
    v = noisy_series()
    v[600] += 1.0
    v[900] = float("nan")
    v[950:] = float("inf")
    assert spikes.divergence(v) == 900
    assert spikes.divergence([1.0, 2.0]) is None
    assert spikes.detect_spikes(v, window=128, k=6) == [600]


def test_spike_report_uses_step_numbers():
    v = noisy_series(500)
    v[[200, 201, 202, 400]] += 1.0
    steps = [10 * i for i in range(500)]
    rep = spikes.spike_report(steps, v, window=100, k=6)
    assert rep["spikes"] == [2000, 2010, 2020, 4000]
    assert rep["events"] == [[2000, 2020], [4000, 4000]]
    assert rep["spike_score"] == pytest.approx(100 * 4 / 400)


def test_spikes_cli_writes_json_and_png(tmp_path):
    v = noisy_series(400)
    v[250] += 1.0
    g = 1.0 + noisy_series(400, seed=1)
    g[300] += 5.0
    rows = []
    for i in range(400):
        rows.append({"step": i, "loss": float(v[i]), "grad_norm": float(g[i]), "lr": 1e-3})
        if i % 100 == 0:
            rows.append({"step": i, "split": "val", "val_loss": 99.0})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spikes.main(["--run", str(tmp_path), "--window", "50", "--k", "6"])
    out = json.loads((tmp_path / "eval" / "spikes.json").read_text())
    assert out["metrics"]["loss"]["spikes"] == [250]
    assert out["metrics"]["grad_norm"]["spikes"] == [300]
    assert out["metrics"]["loss"]["n_values"] == 400  # val rows ignored
    assert (tmp_path / "eval" / "spikes.png").stat().st_size > 0


# --- massive activations ---------------------------------------------------------------------

def test_massive_activation_found_at_its_location():
    torch.manual_seed(0)
    h = torch.randn(2, 12, 16) * 0.1
    h[1, 0, 7] = -500.0
    h[0, 0, 7] = 300.0
    h[1, 5, 2] = 200.0
    plain = torch.randn(2, 12, 16)
    stats = activations.massive_activations([h, plain])
    top = stats[0]["top"]
    assert [(t["value"], t["seq"], t["position"], t["channel"]) for t in top] == [
        (500.0, 1, 0, 7), (300.0, 0, 0, 7), (200.0, 1, 5, 2)]
    median = float(np.median(h.abs().numpy()))
    assert stats[0]["median_abs"] == pytest.approx(median)
    assert stats[0]["ratio_top1_median"] == pytest.approx(500.0 / median)
    assert stats[0]["n_massive"] == 3
    norms = h.norm(dim=-1)
    assert stats[0]["first_token_norm_ratio"] == pytest.approx(
        float(norms[:, 0].mean() / norms[:, 1:].mean()), rel=1e-5)
    assert stats[0]["first_token_norm_ratio"] > 20
    assert stats[1]["n_massive"] == 0
    assert math.isclose(stats[1]["first_token_norm_ratio"], 1.0, rel_tol=0.5)


# --- Gu et al.'s per-sequence Sink_1 and sinks at any position -------------------------------

def gu_reference_sink_rate(attn_per_seq: torch.Tensor, eps: float) -> torch.Tensor:
    """Gu et al.'s compute_attention_sink (eval_sink_open_source.py), restated: (N, L, H, T, T)
    -> Sink per key position in %."""
    N, L, H, T, _ = attn_per_seq.shape
    ratios = torch.arange(T, 0, -1)[None, None, None, :].expand(N, L, H, T, T).to(attn_per_seq)
    importance = (attn_per_seq / ratios).sum(dim=-2)
    return (importance > eps).float().mean(dim=(0, 1, 2)) * 100


def first_token_column(T: int, alpha: float) -> torch.Tensor:
    """One causal head with importance alpha_1 = `alpha`: query 0 sees only token 0 (weight 1),
    every later query puts c on the first token and 1 - c on itself, (1 + (T-1) c) / T = alpha."""
    c = (alpha * T - 1) / (T - 1)
    A = torch.eye(T) * (1 - c)
    A[:, 0] += c
    A[0, 0] = 1.0
    return A


def test_sink_1_thresholds_per_sequence_then_averages():
    """A head with alpha 0.6 on 30% of sequences and 0.15 on the rest: Gu et al. count it on
    30% of sequences; thresholding the averaged alpha (0.285) counts it never."""
    T = 12
    seqs = [first_token_column(T, 0.6 if b < 3 else 0.15) for b in range(10)]
    attn = [torch.stack(seqs)[:, None]]  # one layer, (B=10, H=1, T, T)
    alpha = sink.importance_per_sequence(attn)[0]  # k = 1: (L, B, H)
    assert sink.sink_rate(alpha, 0.3) == pytest.approx(30.0)
    assert sink.sink_rate(alpha.mean(1), 0.3) == 0.0  # the pooled figure
    assert alpha[0, :3, 0].tolist() == pytest.approx([0.6] * 3) and alpha[0, 3:, 0].tolist() == pytest.approx([0.15] * 7)
    ref = gu_reference_sink_rate(torch.stack(seqs)[:, None, None], 0.3)
    assert ref[0].item() == pytest.approx(30.0)


def test_evaluate_matches_gu_reference_on_a_model():
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, block_size=16))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # peaked attention, so that alpha lands on both sides of eps
    seqs = torch.randint(0, 50, (6, 16))
    res = sink.evaluate(model, seqs, lengths=(16,), eps=0.3, batch_size=4)
    with torch.no_grad():
        attn = torch.stack(model(seqs, return_attn=True).attn, dim=1)  # (N, L, H, T, T)
    ref = gu_reference_sink_rate(attn, 0.3)
    assert res.sink_1 == pytest.approx(ref[0].item())
    assert res.sink_rate_by_position == pytest.approx(ref[:10].tolist())


def delimiter_sink(ids: torch.Tensor, delim: int) -> torch.Tensor:
    """(B, H=1, T, T): queries at or after the sequence's first delimiter attend only to it,
    earlier queries spread evenly over what they see."""
    B, T = ids.shape
    A = torch.zeros(B, 1, T, T)
    for b in range(B):
        p = int((ids[b] == delim).nonzero()[0])
        A[b, 0] = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).unsqueeze(1)
        A[b, 0, p:] = 0.0
        A[b, 0, p:, p] = 1.0
    return A


def test_delimiter_sink_at_varying_positions_is_found_and_sink_1_misses_it():
    from eval.sink_positions import CLASSES, PositionStats, token_class

    T, delim = 32, 7
    ids = torch.randint(10, 40, (8, T))
    for b in range(8):
        ids[b, 3 + b] = delim  # the delimiter moves: positions 3..10
    A = delimiter_sink(ids, delim)[None]  # (L=1, B, H, T, T)
    stats = PositionStats(vocab_size=40, eps=0.3)
    stats.add(A, ids)
    assert stats.sink_any() == 100.0
    assert sink.sink_rate(sink.importance_per_sequence(A)[0], 0.3) == 0.0  # Sink_1 sees no sink
    top = stats.top_keys()[0][0]
    assert top["token_id"] == delim and top["token_share"] == 1.0
    assert top["position_share"] == pytest.approx(1 / 8)  # a different position in every sequence
    shares = sink.importance(A, 1)  # sanity: the first token keeps little
    assert shares.item() < 0.3
    classes = [token_class(",", False) if i == delim else "other" for i in range(40)]
    by_class = stats.by_class(classes)
    assert set(by_class) == set(CLASSES)
    assert by_class["punctuation"]["attention"] > 0.5 > by_class["punctuation"]["tokens"]
    assert stats.top_tokens([""] * 40)[0]["token_id"] == delim


def test_token_classes():
    from eval.sink_positions import token_class

    assert [token_class(t, False) for t in ("\n", "\n\n", ".", " ,", "the", " ")] == [
        "newline", "newline", "punctuation", "punctuation", "other", "other"]
    assert token_class("<|endoftext|>", True) == "bos/end-of-text"


def test_f_attn_uniform_baseline():
    for T in (8, 64):
        assert sink.first_token_attention(uniform_causal(T))[1] == pytest.approx(sink.uniform_f_attn(T), abs=1e-6)


# --- spikes: OLMo-core's denominator and OLMo 2's two-sided rule -----------------------------

def test_olmo_core_score_counts_a_step_once_over_all_steps():
    """200 steps, W=50: the per-metric score divides by the 150 eligible steps, OLMo-core's by all
    200, and a step where loss and grad norm both spike counts once."""
    n, w = 200, 50
    loss, grad = noisy_series(n), 1.0 + noisy_series(n, seed=1)
    loss[120] += 1.0
    grad[120] += 1.0
    grad[150] += 1.0
    reports = {"loss": spikes.spike_report(range(n), loss, w, 6), "grad_norm": spikes.spike_report(range(n), grad, w, 6)}
    assert reports["loss"]["spike_score"] == pytest.approx(100 * 1 / 150)
    assert reports["grad_norm"]["spike_score"] == pytest.approx(100 * 2 / 150)
    assert spikes.olmo_core_score(reports, n, w) == pytest.approx(100 * 2 / 200)
    assert spikes.olmo_core_score(reports, w - 1, w) is None


def test_two_sided_rule_flags_drops():
    v = noisy_series(400)
    v[300] -= 1.0
    assert spikes.detect_spikes(v, 128, 7) == []
    assert spikes.detect_spikes(v, 128, 7, two_sided=True) == [300]


# --- massive activations per sequence --------------------------------------------------------

def test_per_sequence_top_and_median_are_averaged_over_sequences():
    """Sun et al. average each sequence's top-1 and median; pooling takes the largest overall."""
    h = torch.ones(2, 4, 5)
    h[0, 0, 0], h[1, 2, 3] = 100.0, 10.0
    stats = activations.massive_activations([h], tokens=torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]))[0]
    assert stats["top_per_seq"][0] == pytest.approx(55.0)
    assert stats["median_per_seq"] == pytest.approx(1.0)
    assert stats["ratio_per_seq"] == pytest.approx(55.0)
    assert stats["top"][0]["value"] == 100.0 and stats["ratio_top1_median"] == pytest.approx(100.0)
    assert [t["token_id"] for t in stats["top"][:2]] == [5, 11]


# --- in-training tracking --------------------------------------------------------------------

def test_measure_agrees_with_the_full_eval_and_the_emergence_plot(tmp_path):
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, block_size=16))
    model.train()
    seqs = torch.randint(0, 50, (4, 16))
    m = measure(model, seqs)
    assert model.training  # left as it was
    full = sink.evaluate(model, seqs, lengths=(16,))
    assert m["sink_1"] == pytest.approx(full.sink_1) and m["f_attn"] == pytest.approx(full.f_attn, abs=1e-6)
    with torch.no_grad():
        hidden = model(seqs, return_hidden=True).hidden
    assert m["max_h_ratio"] == pytest.approx(max(float(h.abs().max() / h.abs().median()) for h in hidden))
    rows = [{"step": s, "loss": 1.0} for s in range(5)] + [{"step": s, **m} for s in (0, 4)]
    torn = json.dumps({"step": 5, **m})[:20]  # the trainer was killed mid-row
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    with pytest.warns(UserWarning, match="torn last line"):
        out = sink.main(["--run", str(tmp_path)])
    assert out[0]["curves"]["sink_1"] == [[0, m["sink_1"]], [4, m["sink_1"]]]
    assert (tmp_path / "eval" / "sink_emergence.png").stat().st_size > 1000


def test_held_out_sequences_start_with_bos_when_asked():
    from probes.sequences import held_out_sequences

    tokens = np.arange(100, 130)
    plain = held_out_sequences(tokens, 3, 8)
    bos = held_out_sequences(tokens, 3, 8, bos_id=0)
    assert plain.tolist()[1] == list(range(108, 116))
    assert bos.shape == (3, 8) and (bos[:, 0] == 0).all() and bos[1, 1:].tolist() == list(range(107, 114))


def test_sink_measures_skip_learned_sink_tokens():
    """With model.sink_tokens, key 0 of Sink_1 and F-Attn is the first text token, not a sink token."""
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=12, vocab_size=11, sink_tokens=1))
    tokens = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        attn = torch.stack(model(tokens, return_attn=True).attn)  # (L, B, H, 13, 13)
    on_first_text = attn[:, :, :, 1:, 1]  # text queries on the first text token: the raw weight
    renormalised = on_first_text / attn[:, :, :, 1:, 1:].sum(-1)  # over the text keys only, rows sum to 1
    result = sink.evaluate(model, tokens, [12])
    assert result.f_attn_raw == pytest.approx(float(on_first_text.mean()), abs=1e-6)
    assert result.f_attn == pytest.approx(float(renormalised.mean()), abs=1e-6)
    assert result.f_attn_raw < result.f_attn  # the sink token takes some weight
    assert measure(model, tokens)["f_attn"] == pytest.approx(float(renormalised.mean()), abs=1e-6)


def test_activations_leave_learned_sink_tokens_out():
    """model.sink_tokens: the learned token carries the largest |h| but is not text. Positions,
    token ids and the first token are the text's, and a top value on the last text token is
    reported at that position (it used to shift by one and fall off the end)."""
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11, sink_tokens=1)).eval()
    with torch.no_grad():
        model.sink_tokens[0, 0, 3] = 500.0  # the learned token: far above anything in the text
        model.embed_tokens.weight[7, 5] = 50.0  # token 7: the text's largest value, in channel 5
    tokens = torch.randint(0, 7, (3, 8), generator=torch.Generator().manual_seed(1))
    tokens[:, -1] = 7  # ... on the last text token
    result = activations.evaluate(model, tokens, batch_size=2)
    with torch.no_grad():
        hidden = [h[:, 1:] for h in model(tokens, return_hidden=True).hidden]  # text positions only
    for layer, h in zip(result.layers, hidden):
        top = layer["top"][0]
        assert (top["position"], top["channel"], top["token_id"]) == (7, 5, 7)
        assert top["value"] == pytest.approx(float(h.abs().max()), rel=1e-5) and top["value"] < 500
        assert layer["first_token_norm"] == pytest.approx(float(h[:, 0].norm(dim=-1).mean()), rel=1e-5)
    assert result.T == 8 and result.sink_tokens == 1 and not result.bos_first


def test_raw_and_renormalised_weights_for_a_sink_logit_by_hand():
    """One head, a virtual sink key: softmax over [slot, k0, k1] gives row 0 = (0.5 | 0.5, -) and
    row 1 = (0.2 | 0.6, 0.2). Raw F-Attn is what reaches BOS's value, (0.5 + 0.6) / 2; renormalised
    over the real keys it is (1 + 0.75) / 2, as the model's probs already hold it."""
    from types import SimpleNamespace

    probs = torch.tensor([[[[1.0, 0.0], [0.75, 0.25]]]])  # (B, H, T, T), rows over the real keys
    mass = torch.tensor([[[0.5, 0.8]]])  # what reaches the values: 1 - slot
    out = SimpleNamespace(attn=[probs], attn_mass=[mass], sink_tokens=0)
    raw, renorm = sink.text_attention(out, raw=True), sink.text_attention(out)
    assert raw[0, 0, 0].tolist() == [[0.5, 0.0], [0.6000000238418579, 0.20000000298023224]]
    assert sink.first_token_attention(raw)[1] == pytest.approx(0.55)
    assert sink.first_token_attention(renorm)[1] == pytest.approx(0.875)


def test_raw_weights_are_what_the_model_applies():
    """On real models: raw rows sum to the applied mass (1 - slot for a sink logit, w's sum for
    sigmoid, 1 - the sink tokens' share); renormalised rows sum to 1; plain softmax has one scale."""
    from model import GPT, GPTConfig

    tokens = torch.randint(0, 10, (2, 12), generator=torch.Generator().manual_seed(0))
    for extra in ({}, {"sink_logit": "learned"}, {"attention": "sigmoid"}, {"sink_tokens": 2}):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=11, **extra)).eval()
        with torch.no_grad():
            out = model(tokens, return_attn=True)
        raw, renorm = sink.text_attention(out, raw=True), sink.text_attention(out)
        torch.testing.assert_close(renorm.sum(-1), torch.ones_like(renorm.sum(-1)))
        n = out.sink_tokens
        applied = torch.stack([a[..., n:, n:].sum(-1) * m[..., n:] for a, m in zip(out.attn, out.attn_mass)])
        torch.testing.assert_close(raw.sum(-1), applied)
        if not extra:
            torch.testing.assert_close(raw, renorm)
        else:
            assert not torch.allclose(raw, renorm)


# --- value-state norms (Gu et al.: sink tokens carry small values) ---------------------------

@pytest.mark.parametrize("sink_tokens", [0, 2])
def test_value_norms_match_a_direct_computation(sink_tokens):
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=16,
                          sink_tokens=sink_tokens)).eval()
    seqs = torch.randint(1, 50, (3, 10))
    seqs[:, 0] = 0
    with torch.no_grad():
        model.embed_tokens.weight[0] = 0.0  # planted: the first token's layer-0 value is exactly zero
        if sink_tokens:
            model.sink_tokens.normal_()
        hidden = model(seqs, return_hidden=True).hidden
        x0 = model.embed_tokens(seqs)
        if sink_tokens:
            x0 = torch.cat((model.sink_tokens.expand(3, -1, -1), x0), dim=1)
        expected = []
        for block, x in zip(model.layers, [x0, *hidden[:-1]]):
            v = block.self_attn.v_proj(block.input_layernorm(x)).view(3, 10 + sink_tokens, 2, 8).norm(dim=-1)
            expected.append((v[:, sink_tokens].mean(0), v[:, sink_tokens + 1:].mean(1).mean(0), v[:, :sink_tokens]))
    got = activations.value_norms(model, seqs, batch_size=2)  # uneven batches: 2 + 1
    assert len(got) == 2
    for row, (first, others, learned) in zip(got, expected):
        assert row["first_token_value_norm_per_head"] == pytest.approx(first.tolist(), rel=1e-5, abs=1e-6)
        assert row["other_tokens_value_norm_per_head"] == pytest.approx(others.tolist(), rel=1e-5)
        assert row["first_token_value_norm_ratio"] == pytest.approx(float(first.mean() / others.mean()), rel=1e-5, abs=1e-6)
        if sink_tokens:
            assert row["sink_tokens_value_norm"] == pytest.approx(float(learned.mean()), rel=1e-5)
        else:
            assert "sink_tokens_value_norm" not in row
    assert got[0]["first_token_value_norm"] == 0.0 and got[0]["other_tokens_value_norm"] > 0


@pytest.mark.parametrize("fix", [{"sink_tokens": 2}, {"sink_logit": "learned"}, {"sink_tokens": 1, "sink_logit": "learned"}])
def test_extra_sink_mass_is_the_weight_outside_the_text(fix):
    """eval.sink's idle-attention readout against a direct computation from the model's weights:
    the learned tokens' columns of the softmax, plus the sink logit's share exp(b) / (exp(b) + sum exp(s))."""
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, block_size=16, backend="math", **fix)).eval()
    with torch.no_grad():
        if fix.get("sink_logit"):
            for block in model.layers:
                block.self_attn.sinks.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
        if fix.get("sink_tokens"):
            model.sink_tokens.normal_()
    seqs = torch.randint(0, 50, (3, 12))
    n = fix.get("sink_tokens", 0)
    with torch.no_grad():
        out = model(seqs, return_attn=True)
    expected = []
    for probs, mass, slot in zip(out.attn, out.attn_mass, out.attn_sink_slot or [None] * 2):
        weights = probs * mass.unsqueeze(-1)  # the real keys' weights (mass = 1 - slot)
        outside = weights[:, :, n:, :n].sum(-1) + (0 if slot is None else slot[:, :, n:])
        assert torch.allclose(weights[:, :, n:].sum(-1) + (0 if slot is None else slot[:, :, n:]), torch.ones(3, 4, 12))
        expected.append(float(outside.mean()))
    got = sink.extra_sink_mass(out)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert 0 < min(expected) and max(expected) < 1
    result = sink.evaluate(model, seqs, lengths=(12,))
    assert result.by_length["12"]["extra_sink_mass"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    plain = GPT(GPTConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, block_size=16)).eval()
    assert sink.evaluate(plain, seqs, lengths=(12,)).by_length["12"]["extra_sink_mass"] is None
