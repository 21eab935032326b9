"""eval.interventions on tiny models against direct computations: the key-0 knockout equals the
reference decoder with key 0 masked (conftest.py), Sun et al.'s massive-activation edit equals a
forward that zeroes / sets the planted channel by hand, and the sink-content test equals a full
forward on the replacement tokens followed by the window."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eval import interventions
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("single_thread")

V = 41


def make_model(ref, **kw) -> GPT:
    cfg = GPTConfig(**{**dict(vocab_size=V, n_embd=32, n_head=2, n_layer=3, block_size=32), **kw})
    return ref.randomize_(GPT(cfg).double(), 0).eval()


def ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def nll_ppl(logits, targets) -> float:
    return math.exp(F.cross_entropy(logits.reshape(-1, V).double(), targets.reshape(-1)).item())


@pytest.mark.parametrize("from_query", [2, 1], ids=["clean", "q1"])
@pytest.mark.parametrize("kw", [dict(), dict(sink_logit="learned"), dict(attention="sigmoid", gate="elementwise"),
                                dict(backend="math", n_kv_head=1, qk_norm=True),
                                dict(sink_logit="learned", sink_value=True, n_kv_head=1)],
                         ids=["softmax", "sink_logit", "sigmoid-gated", "gqa-qknorm-math", "sink_slot"])
def test_knockout_equals_a_forward_with_key_0_masked(ref, kw, from_query):
    """The clean knockout (queries 2.. lose key 0, query 1 keeps it) and the older one (queries 1..) against
    the reference forward with those entries masked."""
    model = make_model(ref, **kw)
    if kw.get("sink_logit"):
        with torch.no_grad():
            for block in model.layers:
                block.self_attn.sinks.normal_(0.0, 1.0)
                if kw.get("sink_value"):
                    block.self_attn.sink_values.normal_(0.0, 1.0)
    seqs = ids(3, 20)
    for layers in ([0, 1, 2], [1]):
        with interventions.knock_out_key0(model, layers, from_query):
            ppl = interventions.perplexity(model, seqs, batch_size=2)
            with torch.no_grad():
                attn = model(seqs[:, :-1], return_attn=True).attn
        expected = ref.gpt(seqs[:, :-1], model.state_dict(), model.config, drop_key0_layers=layers,
                           drop_from=from_query)[0]
        assert ppl == pytest.approx(nll_ppl(expected, seqs[:, 1:]), rel=1e-5)  # 1e-5 nats: the reference rotates in fp32
        for i in layers:  # the weights return_attn gives agree: the knocked-out queries never look at key 0
            assert attn[i][..., from_query:, 0].abs().max() == 0
            assert torch.allclose(attn[i][..., 0, 0], torch.ones(()).double())
            if from_query == 2:  # query 1 still sees key 0
                assert attn[i][..., 1, 0].abs().min() > 0
    plain = interventions.perplexity(model, seqs)
    assert plain == pytest.approx(nll_ppl(ref.gpt(seqs[:, :-1], model.state_dict(), model.config)[0], seqs[:, 1:]), rel=1e-5)
    result = interventions.knockout(model, seqs, from_query=from_query)
    assert result["ppl"] == pytest.approx(plain) and len(result["ppl_per_layer"]) == 3
    assert result["ppl_all_layers"] != pytest.approx(plain)


def planted(ref, channel=5, token=7, value=3000.0):
    """A model whose token `token` carries `value` in residual channel `channel`: a massive activation."""
    model = make_model(ref, tie_embeddings=False)  # (a tied head would turn the planted entry into a huge logit)
    with torch.no_grad():
        model.embed_tokens.weight[token, channel] = value
    return model


def direct_ppl(model, seqs, layer, mask, fill):
    """The edited forward written out: blocks by hand, block `layer`'s output set to `fill` where `mask`."""
    with torch.no_grad():
        x = model.embed_tokens(seqs[:, :-1])
        for i, block in enumerate(model.layers):
            x, _ = block(x)
            if i == layer:
                x = torch.where(mask, fill, x)
        return nll_ppl(model.lm_head(model.norm(x)), seqs[:, 1:])


def test_massive_activations_zeroed_and_set_to_mean_equal_the_direct_edit(ref):
    channel, token = 5, 7
    model = planted(ref, channel, token)
    seqs = ids(4, 24, seed=3)
    seqs[:, 0] = token  # first token massive (as in real models), and once more inside each sequence
    seqs[:, 10] = token
    calibration = ids(4, 24, seed=4)
    calibration[:, 0] = token
    calibration[:, 15] = token
    where = interventions.find_massive(model, calibration)
    assert where["layer"] == 0 and where["channels"] == [channel]
    h0 = interventions.block_outputs(model, calibration)[0]
    first, other = h0[:, 0, channel], h0[:, 1:, channel][calibration[:, 1:] == token]
    assert where["means"][channel]["first"] == pytest.approx(first.mean().item())
    assert where["means"][channel]["other"] == pytest.approx(other.mean().item())

    result = interventions.massive(model, calibration, seqs)
    mask = torch.zeros(4, 23, 32, dtype=torch.bool)
    mask[..., channel] = seqs[:, :-1] == token  # exactly the planted entries
    fill = torch.zeros(4, 23, 32, dtype=torch.float64)
    fill[:, 0, channel], fill[:, 1:, channel] = where["means"][channel]["first"], where["means"][channel]["other"]
    assert result["ppl_zero"] == pytest.approx(direct_ppl(model, seqs, 0, mask, torch.zeros_like(fill)), rel=1e-6)
    assert result["ppl_mean"] == pytest.approx(direct_ppl(model, seqs, 0, mask, fill), rel=1e-6)  # (fp32 logits)
    assert result["ppl"] == pytest.approx(interventions.perplexity(model, seqs))
    assert result["ppl_zero"] != pytest.approx(result["ppl"])  # the edit does something


def test_a_model_without_massive_activations_is_said_so(ref):
    with pytest.raises(ValueError, match="no massive activations"):
        interventions.find_massive(make_model(ref), ids(2, 16))


def test_sink_content_equals_a_full_forward_on_the_replacement_and_the_window(ref):
    # One layer: there, a cached key is what a fresh forward on the kept tokens computes (deeper layers'
    # keys remember the evicted tokens they once saw).
    model = make_model(ref, block_size=16, n_layer=1)
    text = ids(1, 60, seed=5)[0]
    S, W, newline = 2, 9, 3
    result = interventions.sink_content(model, text, [newline] * S, window=W, order="evict-first")
    replaced = torch.cat([torch.tensor([newline] * S), text[S:]])
    nll = result["_nll_replaced"]
    with torch.no_grad():
        for t in (S + W, 30, 58):  # predictions whose queries have lost the middle of the stream
            context = torch.cat([replaced[:S], replaced[t - W + 1 : t + 1]])  # S sinks + W recent, itself last
            logits = model(context[None]).logits[0, -1]
            expected = F.cross_entropy(logits[None].double(), replaced[t + 1 : t + 2]).item()
            assert nll[t] == pytest.approx(expected, rel=1e-6)  # (the stream's logits are fp32)
    assert result["ppl_sinks_replaced"] == pytest.approx(math.exp(float(nll.mean())))
    assert result["ppl_sinks"] != pytest.approx(result["ppl_sinks_replaced"])


def test_cli_on_an_import_writes_every_intervention(tmp_path, monkeypatch):
    import json

    from hf_models import save_tiny

    from model.interop.hf_import import locate

    folder = save_tiny("qwen2", tmp_path / "qwen2")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(6):
        (corpus / f"doc{d}.txt").write_text(f"document {d}: " + "Shall I compare thee to a summer's day?\n" * 30)
    monkeypatch.chdir(tmp_path)
    (result,) = interventions.main(["--ckpt", f"hf:{folder}", "--data", str(corpus), "--n-sink", "2", "--window", "20",
                                    "--tokens", "80", "--n-seqs", "2", "--length", "32", "--device", "cpu"])
    written = json.loads((tmp_path / "out" / "hf" / locate(f"hf:{folder}").name / "eval" / "interventions.json")
                         .read_text())
    from transformers import AutoTokenizer

    newline = AutoTokenizer.from_pretrained(folder)("\n", add_special_tokens=False)["input_ids"]
    assert written["sink_content"]["replacement_ids"] == newline * 2
    assert written["sink_content"]["ppl_sinks_replaced"] == result.ppl_sinks_replaced > 0
    assert "no massive activations" in written["massive"]["skipped"]  # a tiny random model has none
    assert len(written["knockout"]["ppl_per_layer"]) == 2 and written["checkpoint"]["model_type"] == "qwen2"
