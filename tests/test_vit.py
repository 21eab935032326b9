"""The ViT (model/vit.py) on the decoder's attention block, its data, training and artifact analysis.

The reference ViT below is written from the formulas (patchify -> linear -> [CLS, registers,
patches] + position embedding on CLS and patches -> pre-norm blocks without RoPE -> RMSNorm ->
head on CLS) with plain tensor math; it calls no model/ code.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import model.attention
import model.block
from configs import ConfigError, load_config
from data.images import ImageDataConfig, load_images
from eval import vit_artifacts as va
from model.vit import ViT, ViTConfig

os.environ.setdefault("WANDB_MODE", "disabled")
KINDS = ("softmax", "sigmoid", "elu1", "linear")


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(**kw) -> ViTConfig:
    base = dict(image_size=8, patch_size=2, n_layer=2, n_head=2, n_embd=16, n_classes=10, intermediate_size=24)
    return ViTConfig(**{**base, **kw})


# ------------------------------------------------------------------------------ reference
def ref_attention_norope(x, P, cfg, ref):
    """Bidirectional attention without position rotation, every kind and gate (docs/design.md table)."""
    B, T, C = x.shape
    H = cfg.n_head
    D = C // H
    q, k, v = ((x @ P[n].T).view(B, T, H, D) for n in ("q", "k", "v"))
    if cfg.attention == "linear":
        w = torch.einsum("bihd,bjhd->bhij", ref.elu1(q), ref.elu1(k))
        w = w / w.sum(-1, keepdim=True)
    else:
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
        if cfg.attention == "softmax":
            w = torch.exp(s - s.max(-1, keepdim=True).values)
            w = w / w.sum(-1, keepdim=True)
        elif cfg.attention == "sigmoid":
            w = ref.sigmoid(s - math.log(cfg.block_size))
        else:
            w = ref.elu1(s)
    y = torch.einsum("bhij,bjhd->bihd", w, v)
    if cfg.gate == "headwise":
        y = y * ref.sigmoid(x @ P["g"].T)[..., None]
    elif cfg.gate == "elementwise":
        y = y * ref.sigmoid(x @ P["g"].T).view(B, T, H, D)
    return y.reshape(B, T, C) @ P["o"].T


def ref_vit(images, sd, cfg, ref):
    B, C_in = images.shape[:2]
    p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
    patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, g * g, C_in * p * p)
    tok = patches @ sd["patch_embed.weight"].reshape(cfg.n_embd, -1).T + sd["patch_embed.bias"]
    x = torch.cat((sd["cls_token"].expand(B, 1, -1), tok), 1) + sd["pos_embed"]
    if cfg.n_registers:
        x = torch.cat((x[:, :1], sd["registers"].expand(B, -1, -1), x[:, 1:]), 1)
    for i in range(cfg.n_layer):
        pre = f"layers.{i}."
        x = x + ref_attention_norope(ref.rms(x, sd[pre + "input_layernorm.weight"], cfg.norm_eps),
                                     ref.attn_params(sd, pre + "self_attn."), cfg, ref)
        h = ref.rms(x, sd[pre + "post_attention_layernorm.weight"], cfg.norm_eps)
        a, u = h @ sd[pre + "mlp.gate_proj.weight"].T, h @ sd[pre + "mlp.up_proj.weight"].T
        x = x + (a * ref.sigmoid(a) * u) @ sd[pre + "mlp.down_proj.weight"].T
    return ref.rms(x[:, 0], sd["norm.weight"], cfg.norm_eps) @ sd["head.weight"].T + sd["head.bias"]


@pytest.mark.parametrize("gate", ["none", "elementwise", "headwise"])
@pytest.mark.parametrize("attention", KINDS)
def test_vit_is_the_decoder_block_and_matches_reference(ref, attention, gate):
    cfg = tiny(attention=attention, gate=gate, n_registers=2)
    vit = ref.randomize_(ViT(cfg)).double()
    for block in vit.layers:
        assert type(block) is model.block.Block and type(block.self_attn) is model.attention.Attention
        assert block.self_attn.causal is False
    images = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sd = dict(vit.state_dict())
    ref.close(vit(images).logits.double(), ref_vit(images, sd, cfg, ref), 1e-6,
              f"{attention}/{gate} vs reference (logits are cast to float32)")
    # the fast path the backend picks (sdpa / chunked) against the `math` reference of the same block
    math_vit = ViT(tiny(attention=attention, gate=gate, n_registers=2, backend="math")).double()
    math_vit.load_state_dict(vit.state_dict())
    ref.close(vit(images).logits, math_vit(images).logits, 1e-6, f"{attention}/{gate} auto vs math")


def test_non_causal_last_patch_changes_cls():
    vit = ViT(tiny(n_registers=1)).eval()
    images = torch.randn(2, 1, 8, 8)
    changed = images.clone()
    changed[:, :, -2:, -2:] += 3.0  # the last (bottom-right) patch
    with torch.no_grad():
        a, b = (vit(x, return_hidden=True).hidden for x in (images, changed))
    for layer in range(len(a)):
        assert not torch.allclose(a[layer][:, 0], b[layer][:, 0]), f"CLS did not see the last patch in block {layer}"


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_registers_get_no_position_embedding(pos_embed):
    vit = ViT(tiny(n_registers=3, pos_embed=pos_embed))
    assert vit.pos_embed.shape == (1, 1 + 16, 16)  # CLS + patches only
    seen = []
    vit.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    vit(torch.randn(4, 1, 8, 8))
    x = seen[0]
    assert x.shape[1] == 1 + 3 + 16
    # register inputs are the register parameters themselves, identical for every image
    assert torch.equal(x[:, 1:4], vit.registers.expand(4, -1, -1))
    assert torch.equal(x[0, 0], (vit.cls_token + vit.pos_embed[:, :1])[0, 0])


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_head_never_reads_registers(pool):
    vit = ViT(tiny(n_registers=2, pool=pool))
    out = vit(torch.randn(3, 1, 8, 8), return_hidden=True)
    (grad,) = torch.autograd.grad(out.logits.sum(), out.hidden[-1])
    per_token = grad.abs().sum(dim=(0, 2))
    assert per_token[1:3].eq(0).all(), "the head reads the register tokens"
    if pool == "cls":
        assert per_token[0] > 0 and per_token[3:].eq(0).all()
    else:
        assert per_token[0] == 0 and (per_token[3:] > 0).all()


def test_bad_vit_config_is_one_clear_error():
    with pytest.raises(ConfigError, match="model.pool='max' is not one of"):
        load_config("configs/vit_digits.yaml", ["model.pool=max"])
    with pytest.raises(ConfigError, match="task='cnn' is not one of"):
        load_config("configs/vit_digits.yaml", ["task=cnn"])
    with pytest.raises(ConfigError, match="multiple of model.patch_size"):
        load_config("configs/vit_digits.yaml", ["model.patch_size=3"])
    assert isinstance(load_config(None).model, model.GPTConfig)  # the LM default is untouched


# ------------------------------------------------------------------------------ data
def test_image_loader_is_deterministic_and_world_size_exact():
    images = load_images(ImageDataConfig())
    assert images.shape == (1, 8, 8) and images.n_classes == 10
    assert len(images.train_y) + len(images.val_y) == 1797
    full = images.loader("train", 4, seed=1, grad_accum=4, cfg=ImageDataConfig())
    rows = torch.cat([full.get_batch(7, m)[0] for m in range(4)])
    split = [images.loader("train", 4, seed=1, rank=r, world_size=2, grad_accum=2, cfg=ImageDataConfig())
             for r in range(2)]
    assert torch.equal(rows, torch.cat([split[r].get_batch(7, m)[0] for m in range(2) for r in range(2)]))
    assert not torch.equal(full.get_batch(7, 0)[0], full.get_batch(8, 0)[0])
    # augmentation: a shifted digit keeps its ink (background is 0 before normalising) up to the border
    x_aug = full.get_batch(7, 0)[0] * full.std + full.mean
    assert x_aug.min() >= -1e-6 and x_aug.max() <= 1 + 1e-6
    val = images.loader("val", 64, seed=1)
    got = torch.cat([y for _, y in val.eval_windows(10**6)])
    assert torch.equal(got, images.val_y)  # every held-out image once, unaugmented, in order


def test_shift_moves_pixels():
    from data.images import augment

    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0
    y = augment(x, torch.tensor([[1, -1]]), None)
    assert y[0, 0, 2, 0] == 1.0 and y.sum() == 1.0


# ------------------------------------------------------------------------------ training + eval end to end
def test_digits_training_reaches_accuracy_and_eval_runs(tmp_path, capsys):
    import train

    args = ["--config", "configs/vit_digits.yaml", f"out_dir={tmp_path}", "name=v", "model.n_layer=2",
            "train.max_steps=60", "train.eval_interval=30", "train.ckpt_interval=60", "logging.progress=false"]
    assert train.main(args) == 0
    rows = [json.loads(l) for l in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    acc = [r["val_accuracy"] for r in rows if r.get("split") == "val"][-1]
    assert acc > 0.5, f"val accuracy {acc} after 60 steps (chance 0.1)"
    assert "val accuracy" in capsys.readouterr().out

    (result,) = va.main(["--ckpt", str(tmp_path / "v"), "--test-time-register", "--ttr-top-k", "2"])
    # the eval sees the same 359 held-out images as training's eval: the accuracies agree
    assert result.n_images == 359 and result.accuracy == pytest.approx(acc, abs=1e-6)
    out = tmp_path / "v" / "eval"
    saved = json.loads((out / "vit_artifacts.json").read_text())
    assert len(saved["layers"]) == 2 and len(saved["test_time_register"]["outlier_fraction_with"]) == 2
    assert saved["checkpoint"]["step"] == 60 and "checkpoint" in saved["definitions"]
    for png in ("vit_norms.png", "vit_attention.png", "vit_ttr.png"):
        assert (out / png).stat().st_size > 1000


def test_artifacts_cli_bad_path_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        va.main(["--ckpt", str(tmp_path / "nope")])
    assert e.value.code == 2  # as every eval CLI
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "nope").exists()


def test_reference_intervention_is_one_signed_scalar_and_clears_every_token_but_cls():
    """Jiang et al.'s hook: the test-time register gets sign_max over all tokens and the layer's
    chosen units (one scalar per image), and tokens 1:-1 (trained registers too) are zeroed."""
    from model.vit import ViT, ViTConfig

    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=8, patch_size=2, in_channels=1, n_classes=3, n_layer=2, n_embd=16,
                        n_head=2, n_registers=2)).eval()
    units, seen = [3, 7], {}
    down = vit.layers[1].mlp.down_proj
    before = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("before", a[0].clone()))
    with va.test_time_register(vit, [{"layer": 1, "unit": u} for u in units], rule="reference"):
        after = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("after", a[0].clone()))
        vit(torch.randn(2, 1, 8, 8))
    before.remove(), after.remove()
    h0, h1 = seen["before"], seen["after"]  # (B, 1 + 2 + 16 + 1, hidden)
    assert h0.shape[1] == 20
    for b in range(2):
        block = h0[b][:, units]  # every token, both units
        want = block.flatten()[block.abs().flatten().argmax()]  # signed, largest magnitude
        assert torch.equal(h1[b, -1, units], want.expand(2)), "one scalar for every unit of the layer"
        assert want.abs() == block.abs().max() and (block.abs().max() > block.abs()).any()
    assert (h1[:, 1:-1, units] == 0).all()  # registers and patches
    torch.testing.assert_close(h1[:, 0, units], h0[:, 0, units])  # CLS kept
    others = [u for u in range(h0.shape[-1]) if u not in units]
    torch.testing.assert_close(h1[..., others], h0[..., others])


def test_reference_search_keeps_the_detection_layer_apart_from_the_highest_layer():
    """Outliers are read at --ttr-detect-layer (default the last block) while units are searched
    up to --ttr-layer: a unit above the detection layer can be chosen, one above ttr_layer not."""
    T, hidden = 5, 4
    acts = [torch.zeros(1, T, hidden) for _ in range(3)]
    acts[2][0, 2, 1] = 9.0  # the strongest unit sits in block 2, at the outlier token
    acts[0][0, 2, 0] = 1.0
    h = [torch.ones(1, T, 8) for _ in range(3)]
    h[0][0, 2] = 50.0  # the outlier token shows in block 0 only
    got = va.find_register_neurons_reference(acts, h, 20.0, top_k=1, detect_layer=0, max_layer=2)
    assert (got[0]["layer"], got[0]["unit"]) == (2, 1)
    got = va.find_register_neurons_reference(acts, h, 20.0, top_k=1, detect_layer=0, max_layer=1)
    assert (got[0]["layer"], got[0]["unit"]) == (0, 0)


# ------------------------------------------------------------------------------ artifact finder
def test_finder_flags_exactly_the_planted_token():
    B, R, grid, C = 4, 2, 4, 8
    T = 1 + R + grid * grid
    h = torch.randn(B, T, C)
    h = h / h.norm(dim=-1, keepdim=True)  # every token norm 1 ...
    h[:, 0] *= 30.0  # ... a high-norm CLS and registers are not patch outliers
    h[:, 1:1 + R] *= 30.0
    planted = h.clone()
    planted[2, 1 + R + 5] *= 50.0  # patch 5 = row 1, col 1: an interior patch
    masks = va.find_outliers([h, planted], slice(1 + R, T))
    assert not masks[0].any()
    assert masks[1].nonzero().tolist() == [[2, 5]]
    stats = va.artifact_stats([h, planted], R, grid)
    assert stats[1]["n_outliers"] == 1 and stats[1]["outliers_on_border"] == 0
    assert stats[1]["outlier_fraction"] == pytest.approx(1 / (B * grid * grid))
    assert stats[1]["register_norm"]["mean"] == pytest.approx(30.0)
    border = planted.clone()
    border[0, 1 + R + 3] *= 50.0  # patch 3 = row 0, col 3
    assert va.artifact_stats([border], R, grid, threshold=10.0)[0]["outliers_on_border"] == 1
    assert va.border_mask(4).sum() == 12


def test_high_norm_mode_and_where_it_sits():
    B, R, grid, C = 4, 1, 4, 8
    T = 1 + R + grid * grid
    h = torch.randn(B, T, C)
    h = h / h.norm(dim=-1, keepdim=True) * (1 + 0.1 * torch.rand(B, T, 1))  # unimodal, norms 1-1.1
    background = torch.ones(B, grid * grid, dtype=torch.bool)
    background[:, :2] = False  # patches 0 and 1 hold the object
    plain = va.artifact_stats([h], R, grid, background=background)[0]
    assert plain["high_norm_fraction"] == 0 and plain["high_norm_over_median"] is None
    assert plain["max_over_median"] < 1.2
    planted = h.clone()
    planted[1, 1 + R + 9] *= 6.0  # background patch
    planted[3, 1 + R + 12] *= 4.0  # background patch
    planted[0, 1 + R + 0] *= 3.0  # object patch
    s = va.artifact_stats([planted], R, grid, background=background)[0]
    assert s["high_norm_fraction"] == pytest.approx(3 / (B * grid * grid))
    assert s["high_norm_background_share"] == pytest.approx(2 / 3)
    assert 3.0 < s["high_norm_over_median"] < 5.0 and 5.5 < s["max_over_median"] < 7.0


def planted_register_neuron_vit(unit: int = 5) -> ViT:
    """One block, sigmoid attention: MLP unit `unit` fires only on tokens whose channel 0 is set,
    and only a bright patch sets it (no position, CLS or attention output touches channel 0).
    Its down_proj column writes a large vector, so bright patches become high-norm outliers."""
    vit = ViT(tiny(n_layer=1, attention="sigmoid", intermediate_size=16))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for norm in (vit.layers[0].input_layernorm, vit.layers[0].post_attention_layernorm, vit.norm):
            norm.weight.fill_(1.0)
        vit.patch_embed.weight[:, :] = 0.3 * torch.randn(vit.patch_embed.weight.shape, generator=g)
        vit.patch_embed.weight[0] = 1.0  # channel 0 = sum of the patch's pixels
        vit.patch_embed.bias.zero_()
        vit.pos_embed[..., 0] = 0.0
        vit.cls_token[..., 0] = 0.0
        blk = vit.layers[0]
        blk.self_attn.o_proj.weight[0] = 0.0
        mlp = blk.mlp
        mlp.gate_proj.weight[:, 0] = 0.0
        mlp.up_proj.weight[:, 0] = 0.0
        mlp.gate_proj.weight[unit] = 0.0
        mlp.up_proj.weight[unit] = 0.0
        mlp.gate_proj.weight[unit, 0] = 3.0
        mlp.up_proj.weight[unit, 0] = 3.0
        mlp.down_proj.weight[:, unit] = 2.0
    return vit.eval()


def test_test_time_register_moves_the_planted_outlier():
    unit = 5
    vit = planted_register_neuron_vit(unit)
    images = torch.zeros(6, 1, 8, 8)
    for i in range(6):  # one bright patch per image, at different places
        r, c = divmod((3 * i + 1) % 16, 4)
        images[i, 0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = 2.0
    labels = torch.arange(6)
    base = va.run_model(vit, images, labels)
    patches = slice(1, 17)
    masks = va.find_outliers(base["hidden"], patches)
    bright = torch.tensor([(3 * i + 1) % 16 for i in range(6)])
    assert masks[0].sum() == 6 and torch.equal(masks[0].float().argmax(1), bright)

    positions = torch.zeros(6, 17, dtype=torch.bool)
    positions[:, patches] = masks[0]
    acts = va.mlp_inputs(vit, images)
    neurons = va.find_register_neurons(acts, positions, max_layer=0, top_k=1)
    assert [(n["layer"], n["unit"]) for n in neurons] == [(0, unit)]

    with va.test_time_register(vit, neurons):
        ttr = va.run_model(vit, images, labels)
    h0, h1 = base["hidden"][0], ttr["hidden"][0]
    assert h1.shape[1] == 18  # one token appended after the patches
    threshold = va.patch_thresholds(base["hidden"], patches)
    assert not va.find_outliers([h1], patches, threshold)[0].any(), "an outlier is left on the patches"
    extra = h1[:, -1].norm(dim=-1)
    assert (extra > threshold[0]).all(), "the test-time register did not take the outlier"
    torch.testing.assert_close(h1[:, 0], h0[:, 0], rtol=0, atol=1e-6)  # CLS unchanged
    # hooks are gone afterwards
    assert va.run_model(vit, images, labels)["hidden"][0].shape[1] == 17

    result = va.analyse(vit, images, labels, ttr_layer=0, ttr_top_k=1)
    t = result.test_time_register
    assert t["outlier_fraction_without"][0] == pytest.approx(6 / 96) and t["outlier_fraction_with"] == [0.0]
    assert t["accuracy_with"] == t["accuracy_without"]  # the head reads CLS, which did not move


def test_reference_register_neuron_search_and_intervention():
    """Jiang et al.'s rule (absolute norm threshold at one layer, scores per image then averaged,
    register value = the max over tokens) finds the planted unit and clears the patches too."""
    unit = 5
    vit = planted_register_neuron_vit(unit)
    images = torch.zeros(6, 1, 8, 8)
    for i in range(6):
        r, c = divmod((3 * i + 1) % 16, 4)
        images[i, 0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = 2.0
    images[5] = 0.0  # an image without an outlier is skipped, not averaged in as zeros
    labels = torch.arange(6)
    base = va.run_model(vit, images, labels)
    patches = slice(1, 17)
    norms = base["hidden"][0][:, patches].norm(dim=-1)
    cutoff = float((norms.max() + norms.median()) / 2)
    acts = va.mlp_inputs(vit, images)
    neurons = va.find_register_neurons_reference(acts, base["hidden"], cutoff, top_k=1, detect_layer=0)
    assert [(n["layer"], n["unit"]) for n in neurons] == [(0, unit)]
    where = base["hidden"][0].norm(dim=-1) > cutoff
    per_image = [acts[0][b][where[b]].abs().mean(0)[unit] for b in range(5)]
    assert neurons[0]["score"] == pytest.approx(float(sum(per_image) / 5), rel=1e-5)
    with va.test_time_register(vit, neurons, rule="reference"):
        ttr = va.run_model(vit, images, labels)
    assert not va.find_outliers([ttr["hidden"][0]], patches, cutoff)[0].any()
    result = va.analyse(vit, images, labels, ttr_layer=0, ttr_top_k=1, fixed_threshold=cutoff, ttr_rule="reference",
                        ttr_detect_layer=0)
    assert result.layers[0]["outlier_fraction_fixed"] == pytest.approx(5 / 96)
    assert result.test_time_register["rule"] == "reference" and "rule" in result.definitions()


def test_hub_image_dataset_path(monkeypatch):
    """The HF path (no network here): a DatasetDict of PIL images as `load_dataset` returns it."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n):
        imgs = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(n)]
        return datasets.Dataset.from_dict({"img": imgs, "label": [i % 3 for i in range(n)]},
                                          features=datasets.Features({"img": datasets.Image(),
                                                                      "label": datasets.Value("int64")}))

    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: datasets.DatasetDict(
        {"train": split(12), "test": split(5)}))
    images = load_images(ImageDataConfig(source="someone/tiny-images", augment_flip=True))
    assert images.shape == (3, 4, 4) and images.n_classes == 3
    assert len(images.train_y) == 12 and len(images.val_y) == 5 and images.train_x.max() <= 1.0
    x, y = images.loader("train", 4, seed=0, cfg=ImageDataConfig(augment_flip=True)).get_batch(0)
    assert x.shape == (4, 3, 4, 4) and y.dtype == torch.long
    with pytest.raises(ValueError, match="set data.image_field"):
        load_images(ImageDataConfig(source="someone/tiny-images", image_field="pixels"))
