"""hf: import of pretrained vision transformers: tiny random Dinov2 / Dinov2WithRegisters / ViT /
CLIP vision models saved to a temp folder load into sinklab's ViT with transformers' outputs
(last hidden state and pooled output), at the pretraining size and at an interpolated one."""
from __future__ import annotations

import json

import pytest
import torch

from runs.load import load_run

WIDTH, LAYERS, HEADS, PATCH, SIZE = 32, 2, 4, 7, 28
COMMON = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, patch_size=PATCH,
              image_size=SIZE, num_channels=3)
# name: (transformers class, config class, config fields)
MODELS = {
    "dinov2": ("Dinov2Model", "Dinov2Config", {"mlp_ratio": 2, "layerscale_value": 0.5}),
    "dinov2_swiglu": ("Dinov2Model", "Dinov2Config", {"use_swiglu_ffn": True, "layerscale_value": 0.5}),
    "dinov2_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                         {"num_register_tokens": 3, "mlp_ratio": 2}),
    "vit": ("ViTModel", "ViTConfig", {"intermediate_size": 48, "layer_norm_eps": 1e-12}),
    "vit_classifier": ("ViTForImageClassification", "ViTConfig", {"intermediate_size": 48, "num_labels": 5}),
    "clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", {"intermediate_size": 48}),
}


pytestmark = pytest.mark.usefixtures("single_thread")


def save_tiny_vit(name: str, folder, seed: int = 0):
    """Build the tiny `name` model, give every parameter random values (norm weights around 1,
    biases and layer scales non-zero) and save it; returns the transformers model."""
    import transformers

    cls, cfg_cls, fields = MODELS[name]
    cfg = getattr(transformers, cfg_cls)(**COMMON, **fields)
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3 if "embedding" in pname or "token" in pname else 0.15)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: (tmp_path_factory.mktemp(name), name) for name in MODELS}


def hf_outputs(model, x, interpolate: bool):
    kwargs = {"interpolate_pos_encoding": True} if interpolate and "Dinov2" not in type(model).__name__ else {}
    if type(model).__name__ == "ViTForImageClassification":
        out = model(pixel_values=x, output_hidden_states=True, **kwargs)
        return model.vit.layernorm(out.hidden_states[-1]), out.logits
    out = model(pixel_values=x, **kwargs)
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("size", [SIZE, 42], ids=["trained_size", "interpolated"])
@pytest.mark.parametrize("name", list(MODELS))
def test_import_matches_transformers(tmp_path, name, size):
    hf = save_tiny_vit(name, tmp_path)
    run = load_run(f"hf:{tmp_path}", task="vit", image_size=size)
    vit = run.model
    assert run.config["task"] == "vit" and run.config["hf"]["model_type"] == hf.config.model_type
    assert vit.config.n_patches == (size // PATCH) ** 2
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        last, pooled = hf_outputs(hf, x, size != SIZE)
        out = vit(x, return_hidden=True)
    ours_last = out.hidden[-1] if name.startswith("clip") else vit.norm(out.hidden[-1])
    assert ours_last.shape == last.shape
    torch.testing.assert_close(ours_last, last, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, pooled, atol=1e-5, rtol=1e-4)


def test_clip_model_imports_its_vision_tower(tmp_path):
    import transformers

    cfg = transformers.CLIPConfig(vision_config={**COMMON, "intermediate_size": 48},
                                  text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "intermediate_size": 32, "vocab_size": 50})
    torch.manual_seed(0)
    clip = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.05 * torch.randn_like(p))
    clip.save_pretrained(tmp_path)
    run = load_run(f"hf:{tmp_path}", task="vit")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = clip.vision_model(pixel_values=x).pooler_output
        torch.testing.assert_close(run.model(x).logits, ref, atol=1e-5, rtol=1e-4)


def test_normalisation_comes_from_the_preprocessor_or_the_family_default(tmp_path):
    save_tiny_vit("dinov2", tmp_path)
    assert load_run(f"hf:{tmp_path}").config["hf"]["image_mean"] == [0.485, 0.456, 0.406]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1] * 3, "image_std": [0.2] * 3}))
    info = load_run(f"hf:{tmp_path}").config["hf"]
    assert info["image_mean"] == [0.1] * 3 and info["from"] == "preprocessor_config.json"


def test_unsupported_vision_models_are_refused_in_one_line(tmp_path):
    import transformers

    for model_type, cfg, reason in [
        ("deit", transformers.DeiTConfig(**COMMON), "distillation token"),
        ("siglip", transformers.SiglipVisionConfig(**COMMON), "attention-pooling"),
        ("dinov2", transformers.Dinov2Config(**{**COMMON, "hidden_act": "relu"}), "hidden_act='relu'"),
    ]:
        cfg.save_pretrained(tmp_path / model_type)
        with pytest.raises(ValueError, match="cannot import") as e:
            load_run(f"hf:{tmp_path / model_type}", task="vit")
        assert reason in str(e.value) and "\n" not in str(e.value)
    save_tiny_vit("vit", tmp_path / "vit")
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        load_run(f"hf:{tmp_path / 'vit'}", image_size=30)
    with pytest.raises(ValueError, match="not a lm model"):
        load_run(f"hf:{tmp_path / 'vit'}", task="lm")


def test_new_vit_fields_default_to_the_lab_vit():
    """The options the imports need change nothing when left at their defaults (same parameters)."""
    from model.vit import ViT, ViTConfig

    torch.manual_seed(0)
    names = {n: p.shape for n, p in ViT(ViTConfig(n_classes=3)).named_parameters()}
    assert not any("layer_scale" in n or "pre_norm" in n or n.endswith("o_proj.bias") for n in names)
    assert "layers.0.mlp.gate_proj.weight" in names and "layers.0.input_layernorm.bias" not in names
    with pytest.raises(ValueError, match="model.mlp="):
        ViTConfig(n_classes=3, mlp="relu").validate()
    with pytest.raises(ValueError, match="pos_embed_grid"):
        ViTConfig(n_classes=3, pos_embed="sincos", pos_embed_grid=3).validate()
