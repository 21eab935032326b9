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
                # Guo et al. count every query, the BOS query (i = 0, not a trigger) included
                vals = [attn[l][b, h, i, 0].item() for b in range(B) for i in range(T)
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
        layer[:, :, 0, 0] = 1.0  # query 0 sees only BOS (in the mean, as Gu et al.: i >= k)
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
    assert torch.allclose(torch.tensor(result.bos_attention_non_trigger), want["non_trigger"], atol=1e-6)
    assert result.sink_1 == pytest.approx(sink_1(attn))
    assert result.n_queries_trigger == int(torch.isin(tokens, torch.tensor([3, 4])).sum())
    assert result.n_queries_non_trigger == tokens.numel() - result.n_queries_trigger  # BOS query included


def test_extra_sink_mass_is_the_weight_outside_the_text():
    """Sink tokens: the summed weight on them; sink logit: the virtual key's weight. Both equal
    1 - (weight on the text keys), computed here from the rows of the text attention."""
    from model import GPT, GPTConfig

    tokens = torch.randint(0, 10, (4, 12), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 10
    for extra in ({"sink_tokens": 2}, {"sink_logit": "learned"}):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=12, vocab_size=11, **extra))
        result = evaluate(model, tokens, [3, 4], batch_size=4)
        with torch.no_grad():
            out = model(tokens, return_attn=True)
        n = out.sink_tokens
        if n:
            outside = torch.stack([1 - a[:, :, n:, n:].sum(-1) for a in out.attn])  # (L, B, H, T)
        else:
            outside = torch.stack([1 - m for m in out.attn_mass])
        non_trigger = ~torch.isin(tokens, torch.tensor([3, 4]))
        want = (outside * non_trigger[None, :, None]).sum((1, 3)) / non_trigger.sum()
        assert torch.allclose(torch.tensor(result.extra_sink_mass_non_trigger), want, atol=1e-5)
        assert 0.05 < float(want.mean()) < 0.95  # the measure sees real weight, not a constant
        # BOS is the first text key: its weight is read past the sink tokens. Raw: the weight the
        # model puts on it (probs times the row mass that reaches the values); renormalised: that
        # over the row's total on the text keys.
        mass = torch.stack(out.attn_mass)[:, :, :, n:]
        bos_raw = torch.stack([a[:, :, n:, n] for a in out.attn]) * mass
        text_total = torch.stack([a[:, :, n:, n:].sum(-1) for a in out.attn]) * mass
        for name, bos in (("bos_attention_non_trigger_raw", bos_raw), ("bos_attention_non_trigger", bos_raw / text_total)):
            want_bos = (bos * non_trigger[None, :, None]).sum((1, 3)) / non_trigger.sum()
            assert torch.allclose(torch.tensor(getattr(result, name)), want_bos, atol=1e-5)
        assert result.bos_attention_non_trigger_raw_mean < result.bos_attention_non_trigger_mean


def test_long_stream_has_bos_only_first_and_follows_the_process():
    from data.bigram_backcopy import estimate_chain

    from eval.backcopy import long_stream

    chain = estimate_chain(["the cat sat on a mat, the end", "an ant at eat"], n_triggers=2)
    stream = long_stream(chain, 500)
    assert stream.shape == (500,) and stream[0] == chain.bos_id
    assert not (stream[1:] == chain.bos_id).any()
    assert torch.equal(stream, long_stream(chain, 500))  # deterministic
    after_trigger = torch.isin(stream[1:-1], torch.from_numpy(chain.triggers))
    after_trigger[0] = False  # the first character follows BOS, not a character pair
    assert after_trigger.sum() > 20
    assert torch.equal(stream[2:][after_trigger], stream[:-2][after_trigger])  # copies the token before the trigger
