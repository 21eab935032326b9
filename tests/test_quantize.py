"""eval/quantize.py against direct computations: the quantised linear equals an integer matmul
times its scales; int8 without outliers is nearly lossless; a planted massive activation at the
linear inputs ruins W8A8 but not weight-only int8; the weights come back unchanged; the CLI
writes its JSON with a definitions block."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from eval import quantize
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("single_thread")
V = 48


def test_quantized_linear_equals_an_integer_matmul_times_its_scales():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(24, 10, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, 24, generator=g, dtype=torch.float64))
    x = torch.randn(3, 7, 24, generator=g, dtype=torch.float64)
    # by hand: int8 weights per row, one int8 scale per sequence for the input
    w = lin.weight.detach()
    s_w = w.abs().amax(1) / 127
    w_int = torch.round(w / s_w[:, None]).to(torch.int64)
    s_x = x.reshape(3, -1).abs().amax(1) / 127
    x_int = torch.round(x / s_x[:, None, None]).to(torch.int64)
    assert w_int.abs().max() == 127 and x_int.abs().max() == 127
    expected = (x_int @ w_int.T).double() * s_x[:, None, None] * s_w  # integer accumulation, then scales

    class One(torch.nn.Module):  # quantized() walks model.layers
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": lin})])

    model = One()
    with quantize.quantized(model, "w8a8"):
        got = lin(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(lin.weight, w)  # restored

    # int4 weights: levels -7..7 per row
    w4 = quantize.quantize_rows(w, 4)
    levels = w4 / (w.abs().amax(1, keepdim=True) / 7)
    torch.testing.assert_close(levels, levels.round())
    assert levels.abs().max() == 7
    assert (quantize.quantize_rows(torch.zeros(2, 5), 8) == 0).all()


def tiny(seed=0):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=V)
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # weights large enough that the blocks, not only the embedding, shape the logits
        model.embed_tokens.weight.normal_(0, 1.0)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.05)
    return model


def plant_massive_input(model, channel: int = 5, size: float = 2000.0):
    """A massive activation in every block's attention input that the fp32 model ignores: channel
    `channel` of input_layernorm's weight is `size` and the q / k / v weights read nothing from it.
    In fp32 and with weight-only int8 the function is unchanged (a zero column stays zero); W8A8's
    per-tensor scale becomes size / 127 and rounds the other channels away."""
    with torch.no_grad():
        for block in model.layers:
            block.input_layernorm.weight[channel] = size
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                proj.weight[:, channel] = 0.0
    return model


SEQS = torch.randint(0, V, (6, 24), generator=torch.Generator().manual_seed(1))


def logit_errors(model) -> dict[str, float]:
    """Per mode: ||logits_q - logits|| / ||logits - their row means||, on SEQS."""
    with torch.no_grad():
        ref = model(SEQS).logits
        out = {}
        for mode in quantize.MODES:
            with quantize.quantized(model, mode):
                out[mode] = float((model(SEQS).logits - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm())
    return out


def test_perplexity_is_exp_of_the_mean_nll_of_each_quantised_model():
    model = tiny()
    r = quantize.evaluate(model, SEQS)
    assert set(r.modes) == set(quantize.MODES) and r.n_linears == 2 * 7  # q k v o gate up down per block
    for mode in quantize.MODES:
        with quantize.quantized(model, mode), torch.no_grad():
            nll = F.cross_entropy(model(SEQS[:, :-1]).logits.reshape(-1, V), SEQS[:, 1:].reshape(-1))
        assert math.isclose(r.modes[mode]["nll"], nll.item(), rel_tol=1e-6), mode
        assert r.modes[mode]["ppl"] == math.exp(r.modes[mode]["nll"])
    assert len({round(r.modes[m]["ppl"], 9) for m in quantize.MODES}) == 4  # every mode changes something


def test_int8_nearly_lossless_and_a_planted_massive_activation_hurts_w8a8_only():
    clean = logit_errors(tiny())
    assert clean["fp32"] == 0 and clean["w8"] < 2e-3 and clean["w8a8"] < 5e-3
    assert clean["w4"] > 5 * clean["w8"]  # 4 bits cost more than 8
    planted_model = plant_massive_input(tiny())
    planted = logit_errors(planted_model)
    assert abs(planted["w8"] - clean["w8"]) < 1e-3  # weight-only: the outlier costs nothing
    assert planted["w8a8"] > 10 * clean["w8a8"] and planted["w8a8"] > 0.03
    r = quantize.evaluate(planted_model, SEQS)
    assert r.linear_input_absmax_max > 1000 and "self_attn" in r.linear_input_absmax_where
    assert r.linear_input_absmax_median < 100


def test_evaluate_restores_the_weights_and_refuses_non_fp32():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize.evaluate(model, torch.randint(0, V, (2, 10)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="fp32"):
        quantize.evaluate(tiny().to(torch.bfloat16), torch.randint(0, V, (2, 10)))


def test_cli_writes_json_with_definitions(tiny_run_args, tmp_path):
    import train

    out = tmp_path / "out"
    train.main([*tiny_run_args(4), f"out_dir={out}", "name=q"])
    quantize.main(["--ckpt", str(out / "q"), "--n-seqs", "2", "--length", "16"])
    data = json.loads((out / "q" / "eval" / "quantize.json").read_text())
    assert set(data["modes"]) == set(quantize.MODES) and data["T"] == 16 and data["n_seqs"] == 2
    assert {"w8", "w4", "w8a8", "modes", "checkpoint"} <= set(data["definitions"])
    with pytest.raises(SystemExit) as e:
        quantize.main(["--ckpt", str(out / "q"), "--dtype", "bf16"])
    assert e.value.code == 2
