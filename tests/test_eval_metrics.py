"""Metric definitions of eval/sink.py, eval/spikes.py and eval/activations.py against
hand-built inputs with known answers (fast, CPU)."""
import json
import math

import numpy as np
import pytest
import torch

from eval import activations, sink, spikes


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
