"""The compression-valley readout of eval/activations.py (Queipo-de-Llano et al. 2025) against a
direct eigen computation: the Shannon entropy of the spectrum of K / tr(K), K = X X^T of the
uncentred token representations, and where a massive activation puts the valley."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eval import activations
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def direct_entropy(x: np.ndarray) -> float:
    """-sum p log p over p = eigenvalues of X X^T / trace, from numpy's eigensolver of the T x T Gram."""
    k = x @ x.T
    lam = np.clip(np.linalg.eigvalsh(k / np.trace(k)), 0, None)
    lam = lam[lam > 0]
    return float(-(lam * np.log(lam)).sum())


@pytest.mark.parametrize("T,C", [(12, 16), (20, 8)], ids=["T<C", "T>C"])
def test_matrix_entropy_equals_a_direct_eigen_computation(T, C):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, T, C, generator=g) * torch.linspace(0.1, 3, C)  # an uneven spectrum
    got = activations.matrix_entropy(h)
    for b in range(3):
        assert got[b].item() == pytest.approx(direct_entropy(h[b].double().numpy()), rel=1e-9)
        s = np.linalg.svd(h[b].double().numpy(), compute_uv=False)  # the same as sigma^2 / ||X||_F^2
        p = s**2 / (s**2).sum()
        assert got[b].item() == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)


def test_matrix_entropy_limits():
    assert activations.matrix_entropy(torch.eye(6).unsqueeze(0) * 3.0).item() == pytest.approx(math.log(6))
    rank_one = torch.outer(torch.randn(10), torch.randn(7)).unsqueeze(0)
    assert activations.matrix_entropy(rank_one).item() == pytest.approx(0.0, abs=1e-6)
    assert activations.matrix_entropy(torch.zeros(1, 4, 5)).item() == 0.0


def test_a_massive_first_token_makes_the_valley_there():
    """Sun et al.'s pattern: a middle layer whose first token is huge in a few channels. Its entropy is
    lowest (Queipo-de-Llano et al.'s bound: the BOS row takes at least M^2 / ||X||_F^2 of the spectrum)."""
    g = torch.Generator().manual_seed(1)
    plain = [torch.randn(4, 16, 32, generator=g) for _ in range(3)]
    massive = plain[1].clone()
    massive[:, 0, 3] = 400.0
    stats = activations.massive_activations([plain[0], massive, plain[2]])
    norm = [s["matrix_entropy_normalised"] for s in stats]
    assert int(np.argmin(norm)) == 1 and norm[1] < 0.3 < 0.8 < min(norm[0], norm[2])
    share = (400.0**2) / (massive.double() ** 2).sum((1, 2))  # the BOS row's share of ||X||_F^2
    p1 = share.clamp(max=1)
    bound = -(p1 * p1.log() + (1 - p1) * (1 - p1).log()) + (1 - p1) * math.log(15)  # H <= h(p1) + (1 - p1) log(r - 1)
    assert stats[1]["matrix_entropy"] <= float(bound.mean()) + 1e-9


def test_evaluate_reports_valley_and_massive_layers(ref):
    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=40)
    model = ref.randomize_(GPT(cfg), 0).eval()
    seqs = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(2))
    r = activations.evaluate(model, seqs)
    norm = [l["matrix_entropy_normalised"] for l in r.layers]
    with torch.no_grad():
        hidden = model(seqs, return_hidden=True).hidden
    for l, h in zip(r.layers, hidden):
        expected = np.mean([direct_entropy(x.double().numpy()) for x in h])
        assert l["matrix_entropy"] == pytest.approx(expected, rel=1e-6)
        assert l["matrix_entropy_normalised"] == pytest.approx(expected / math.log(16), rel=1e-6)
    assert r.entropy_valley_layer == 1 + int(np.argmin(norm)) and r.min_matrix_entropy_normalised == min(norm)
    assert r.massive_activation_layer == 1 + int(np.argmax([l["top_per_seq"][0] for l in r.layers]))
    assert {"matrix_entropy", "entropy_valley_layer"} <= set(r.to_json()["definitions"])
