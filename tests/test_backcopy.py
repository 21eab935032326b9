"""eval/backcopy.py: Guo et al.'s BOS attention by query kind and per-sequence Sink_1, checked
against loops written from the definitions."""
import pytest
import torch

from eval.backcopy import bos_attention, evaluate, sink_1


def random_causal_attn(L, B, H, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(L, B, H, T, T, generator=g) * 2
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    return list(scores.softmax(-1))


def test_bos_attention_matches_loops():
    L, B, H, T = 2, 3, 4, 7
    attn = random_causal_attn(L, B, H, T)
    tokens = torch.tensor([[9, 1, 2, 1, 3, 4, 2], [9, 3, 3, 3, 3, 3, 3], [9, 1, 1, 1, 1, 1, 1]])
    triggers = [1, 2]
    got = bos_attention(attn, tokens, triggers)
    for kind, want_trigger in (("non_trigger", False), ("trigger", True)):
        for l in range(L):
            for h in range(H):
                vals = [attn[l][b, h, i, 0].item() for b in range(B) for i in range(1, T)
                        if (tokens[b, i].item() in triggers) == want_trigger]
                assert got[kind][l, h].item() == pytest.approx(sum(vals) / len(vals), rel=1e-6)
    # No trigger at all: the trigger row is undefined, not zero.
    assert torch.isnan(bos_attention(attn, tokens, [])["trigger"]).all()


def test_sink_1_per_sequence():
    # Sequence 0: head 0 of layer 0 puts 0.5 on BOS from every query i >= 1, the rest 0.1;
    # sequence 1: nothing above 0.3. Per sequence 1/4 and 0/4 of the (layer, head) pairs -> 12.5%.
    L, B, H, T = 2, 2, 2, 5
    attn = [torch.zeros(B, H, T, T) for _ in range(L)]
    for layer in attn:
        layer[:, :, :, 0] = 0.1
        layer[:, :, 0, 0] = 1.0  # query 0 sees only BOS; it is left out of the mean
    attn[0][0, 0, 1:, 0] = 0.5
    assert sink_1(attn, eps=0.3) == pytest.approx(12.5)
    assert sink_1(attn, eps=0.05) == pytest.approx(100.0)


def test_evaluate_on_a_model():
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=11))
    tokens = torch.randint(0, 10, (6, 16))
    tokens[:, 0] = 10
    result = evaluate(model, tokens, [3, 4], batch_size=4)
    with torch.no_grad():
        attn = model(tokens, return_attn=True).attn
    want = bos_attention(attn, tokens, [3, 4])
    assert torch.allclose(torch.tensor(result["bos_attention_non_trigger"]), want["non_trigger"], atol=1e-6)
    assert result["sink_1"] == pytest.approx(sink_1(attn))
    assert result["n_queries_trigger"] == int(torch.isin(tokens[:, 1:], torch.tensor([3, 4])).sum())
