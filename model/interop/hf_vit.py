"""Pretrained `transformers` vision transformers as sinklab ViTs, with the same outputs.

    from runs.load import load_run
    run = load_run("hf:facebook/dinov2-small", task="vit", image_size=224)   # or hf:/a/saved/folder

| model_type | transformers class | what it maps to |
|---|---|---|
| dinov2 | Dinov2Model | LayerNorm, GELU (or SwiGLU with biases) MLP, layer scale, bicubic position resampling |
| dinov2_with_registers | Dinov2WithRegistersModel | the same + `n_registers` (antialiased resampling) |
| vit (ViT, DeiT without distillation) | ViTModel, ViTForImageClassification | LayerNorm, GELU MLP; pooler -> `head: tanh`, classifier -> `head: linear` |
| clip_vision_model, clip | CLIPVisionModel (a CLIPModel's vision tower) | `pre_norm`, quick-GELU MLP, no patch bias |

Every one has q/k/v and o_proj biases and softmax attention over [CLS, (registers), patches].
The ViT's `logits` are the model's pooled output (`pooler_output`): the normed CLS for DINOv2
and CLIP, tanh(dense(normed CLS)) for ViT's pooler, or the classifier's logits. transformers'
`last_hidden_state` is `model.norm(hidden[-1])` for DINOv2 and ViT and `hidden[-1]` for CLIP,
whose final norm only touches the pooled CLS. Any image size that is a multiple of the patch
size works: the learned position table is resampled as transformers resamples it (its
`interpolate_pos_encoding`). Anything else is refused in one line naming what the ViT lacks.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..vit import ViTConfig
from .hf_folder import check_shapes, read_json

TYPES = ("dinov2", "dinov2_with_registers", "vit", "clip_vision_model", "clip")
GAPS = {
    "deit": "DeiT's distillation token (the DeiT checkpoints without distillation are model_type vit and import)",
    "siglip_vision_model": "an attention-pooling (MAP) head and patch tokens without a CLS token",
    "siglip": "an attention-pooling (MAP) head and patch tokens without a CLS token",
    "beit": "relative position biases",
    "data2vec-vision": "relative position biases",
    "swin": "windowed attention and patch merging",
    "dinov3_vit": "2-D RoPE positions",
    "vit_mae": "random patch masking in the forward pass",
    "ijepa": "patch tokens without a CLS token",
}
# Image normalisation when the folder has no preprocessor_config.json: transformers' processor defaults.
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
DEFAULT_NORMALISATION = {
    "dinov2": IMAGENET, "dinov2_with_registers": IMAGENET, "vit": ([0.5] * 3, [0.5] * 3),
    "clip_vision_model": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
}
DEFAULT_NORMALISATION["clip"] = DEFAULT_NORMALISATION["clip_vision_model"]
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}


def is_vision(model_type: str) -> bool:
    """Whether a transformers model_type is a vision transformer (imported here, or refused here)."""
    return model_type in TYPES or model_type in GAPS


def pretrained_vision(ref: str):
    """The located model (hf_import.Pretrained) when `hf:<ref>` is a vision transformer's
    transformers folder (imported or refused here), else None (a decoder or a GGUF file, for
    model/interop/hf_import.py, which also names a missing one)."""
    from .hf_import import locate

    try:
        source = locate(ref)
        if source.gguf is not None:
            return None
        config = source.folder / "config.json"
        if not config.is_file():
            return None
    except (FileNotFoundError, ValueError, OSError):
        return None
    model_type = read_json(config).get("model_type")  # a damaged config.json: ValueError naming it
    return source if is_vision(model_type) else None


def _square(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"cannot import this ViT: sinklab's ViT lacks non-square {what}s (got {list(value)})")
        value = value[0]
    return int(value)


def vision_config(hf_cfg):
    """The vision part of a transformers config (a CLIPModel's vision_config)."""
    return hf_cfg.vision_config if hf_cfg.model_type == "clip" else hf_cfg


def vit_config(hf_cfg, image_size: int | None = None, head: tuple[str, int | None] = ("none", None)) -> ViTConfig:
    """The ViTConfig that computes what this transformers config computes at `image_size` (None:
    the pretraining size), or ValueError naming what the ViT lacks. `head`: (kind, width) of the
    checkpoint's head (`head_of`)."""
    arch = hf_cfg.model_type
    if arch not in TYPES:
        lacks = GAPS.get(arch, "an implementation of this architecture")
        raise ValueError(f"cannot import model_type {arch!r}: sinklab's ViT lacks {lacks}; it imports {', '.join(TYPES)}")
    v = vision_config(hf_cfg)
    patch = _square(v.patch_size, "patch")
    trained = _square(v.image_size, "image")
    size = trained if image_size is None else int(image_size)
    for key, value in (("patch_size", patch), ("image_size", trained), ("hidden_size", v.hidden_size),
                       ("num_hidden_layers", v.num_hidden_layers), ("num_attention_heads", v.num_attention_heads)):
        if value <= 0:
            raise ValueError(f"cannot import this {arch} model: its config.json has {key}={value}; a positive "
                             "integer is needed (the config is damaged)")
    act = HF_ACTIVATIONS.get(v.hidden_act)
    dinov2 = arch.startswith("dinov2")
    swiglu = dinov2 and v.use_swiglu_ffn
    gaps = []
    if act is None and not swiglu:
        gaps.append(f"hidden_act={v.hidden_act!r} (it has {', '.join(HF_ACTIVATIONS)})")
    if size % patch or trained % patch:
        gaps.append(f"an image size ({size}, trained at {trained}) that is not a multiple of the patch size {patch}")
    if head[0] == "tanh" and getattr(v, "pooler_act", "tanh") != "tanh":
        gaps.append(f"pooler_act={v.pooler_act!r} (ViT's pooler is tanh)")
    if gaps:
        raise ValueError(f"cannot import this {arch} model: sinklab's ViT lacks " + "; ".join(gaps))
    if dinov2:
        hidden = int(v.hidden_size * v.mlp_ratio)
        if swiglu:  # transformers' Dinov2SwiGLUFFN: 2/3 of the width, rounded up to a multiple of 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    else:
        hidden = v.intermediate_size
    grid = trained // patch
    return ViTConfig(
        image_size=size, patch_size=patch, in_channels=v.num_channels, n_layer=v.num_hidden_layers,
        n_head=v.num_attention_heads, n_embd=v.hidden_size, intermediate_size=hidden,
        n_registers=getattr(v, "num_register_tokens", 0) if arch == "dinov2_with_registers" else 0,
        n_classes=head[1],
        pool="cls", pos_embed="learned", attention="softmax", norm_eps=v.layer_norm_eps,
        attention_bias=bool(getattr(v, "qkv_bias", True)), norm="layernorm",
        mlp="swiglu" if swiglu else act, mlp_bias=True, o_proj_bias=True,
        layer_scale=float(v.layerscale_value) if dinov2 else None, pre_norm=arch.startswith("clip"),
        patch_bias=not arch.startswith("clip"), pos_embed_grid=None if grid == size // patch else grid,
        pos_embed_antialias=arch == "dinov2_with_registers", head=head[0],
    )


# transformers' checkpoint names (as save_pretrained writes them) -> sinklab's, per family: a
# pattern matches the start of a name, the rest of the name is kept
_LAYER = r"encoder\.layers?\.(\d+)\."
RULES = {
    "dinov2": [
        (r"embeddings\.cls_token", "cls_token"), (r"embeddings\.register_tokens", "registers"),
        (r"embeddings\.position_embeddings", "pos_embed"),
        (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
        (_LAYER + r"norm1\.", r"layers.\1.input_layernorm."), (_LAYER + r"norm2\.", r"layers.\1.post_attention_layernorm."),
        (_LAYER + r"attention\.attention\.query\.", r"layers.\1.self_attn.q_proj."),
        (_LAYER + r"attention\.attention\.key\.", r"layers.\1.self_attn.k_proj."),
        (_LAYER + r"attention\.attention\.value\.", r"layers.\1.self_attn.v_proj."),
        (_LAYER + r"attention\.output\.dense\.", r"layers.\1.self_attn.o_proj."),
        (_LAYER + r"layer_scale(1|2)\.lambda1", r"layers.\1.layer_scale\2"),
        (_LAYER + r"mlp\.fc1\.", r"layers.\1.mlp.up_proj."), (_LAYER + r"mlp\.fc2\.", r"layers.\1.mlp.down_proj."),
        (_LAYER + r"mlp\.weights_in\.", r"layers.\1.mlp.weights_in."),  # split below
        (_LAYER + r"mlp\.weights_out\.", r"layers.\1.mlp.down_proj."),
        (r"layernorm\.", "norm."),
    ],
    "vit": [
        (r"embeddings\.cls_token", "cls_token"), (r"embeddings\.position_embeddings", "pos_embed"),
        (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
        (_LAYER + r"layernorm_before\.", r"layers.\1.input_layernorm."),
        (_LAYER + r"layernorm_after\.", r"layers.\1.post_attention_layernorm."),
        (_LAYER + r"attention\.attention\.query\.", r"layers.\1.self_attn.q_proj."),
        (_LAYER + r"attention\.attention\.key\.", r"layers.\1.self_attn.k_proj."),
        (_LAYER + r"attention\.attention\.value\.", r"layers.\1.self_attn.v_proj."),
        (_LAYER + r"attention\.output\.dense\.", r"layers.\1.self_attn.o_proj."),
        (_LAYER + r"intermediate\.dense\.", r"layers.\1.mlp.up_proj."),
        (_LAYER + r"output\.dense\.", r"layers.\1.mlp.down_proj."),
        (r"layernorm\.", "norm."), (r"pooler\.dense\.", "head."), (r"classifier\.", "head."),
    ],
    "clip": [
        (r"embeddings\.class_embedding", "cls_token"), (r"embeddings\.position_embedding\.weight", "pos_embed"),
        (r"embeddings\.patch_embedding\.weight", "patch_embed.weight"), (r"pre_layrnorm\.", "pre_norm."),
        (_LAYER + r"layer_norm1\.", r"layers.\1.input_layernorm."),
        (_LAYER + r"layer_norm2\.", r"layers.\1.post_attention_layernorm."),
        (_LAYER + r"self_attn\.(q|k|v)_proj\.", r"layers.\1.self_attn.\2_proj."),
        (_LAYER + r"self_attn\.out_proj\.", r"layers.\1.self_attn.o_proj."),
        (_LAYER + r"mlp\.fc1\.", r"layers.\1.mlp.up_proj."), (_LAYER + r"mlp\.fc2\.", r"layers.\1.mlp.down_proj."),
        (r"post_layernorm\.", "norm."),
    ],
}
# Prefixes of task wrappers (ViTForImageClassification's `vit.`, a CLIPModel's `vision_model.`) and
# tensors that a backbone import does not use.
PREFIXES = ("vision_model.", "vit.", "dinov2_with_registers.", "dinov2.")
UNUSED = re.compile(r"(embeddings\.mask_token|position_ids|text_model\.|text_projection|visual_projection|logit_scale)")


def family(arch: str) -> str:
    return "dinov2" if arch.startswith("dinov2") else "clip" if arch.startswith("clip") else "vit"


def head_of(hf_state: dict, arch: str) -> tuple[str, int | None]:
    """(kind, width) of the checkpoint's head: ViT's pooler ("tanh"), a ViT classifier ("linear"),
    or ("none", None). DINOv2's classifier reads CLS and the mean patch together, which sinklab's
    head does not: its backbone is imported without it."""
    if family(arch) == "vit":
        for name, kind in (("pooler.dense.weight", "tanh"), ("classifier.weight", "linear")):
            for key in (name, "vit." + name):
                if key in hf_state:
                    return kind, hf_state[key].shape[0]
    return "none", None


def to_sinklab_vit_weights(hf_state: dict, arch: str) -> dict[str, torch.Tensor]:
    """transformers' names -> sinklab's; a tensor no rule names is an error (nothing silently dropped)."""
    rules = [(re.compile(p), r) for p, r in RULES[family(arch)]]
    state = {}
    for name, t in hf_state.items():
        if UNUSED.match(name) or (family(arch) == "dinov2" and name.startswith("classifier.")):
            continue
        for prefix in PREFIXES:
            name = name.removeprefix(prefix)
        for pattern, repl in rules:  # each rule names the start of a tensor's name
            m = pattern.match(name)
            if m:
                new = m.expand(repl) + name[m.end():]
                break
        else:
            raise ValueError(f"cannot import this {arch} model: no sinklab ViT weight for its tensor {name!r}")
        if ".mlp.weights_in." in new:
            gate, up = t.chunk(2, dim=0)  # DINOv2's fused SwiGLU input: [gate | up]
            state[new.replace("weights_in", "gate_proj")], state[new.replace("weights_in", "up_proj")] = gate, up
            continue
        if new == "cls_token":
            t = t.reshape(1, 1, -1)  # CLIP stores it as (C,)
        elif new == "pos_embed":
            t = t.reshape(1, -1, t.shape[-1])  # CLIP stores an nn.Embedding table (1 + N, C)
        state[new] = t
    return state


def _pixel_stats(value, key: str, channels: int, path: Path) -> list[float]:
    """image_mean / image_std as `channels` finite floats (one number stands for every channel), else
    ValueError naming the file; a std must be > 0 (it divides every pixel)."""
    values = value if isinstance(value, list) else [value]
    ok = (len(values) in (1, channels) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
          and all(math.isfinite(v) for v in values) and (key != "image_std" or all(v > 0 for v in values)))
    if not ok:
        want = "positive finite numbers" if key == "image_std" else "finite numbers"
        raise ValueError(f"{path}: {key}={value!r} is not {channels} {want} (one per channel); fix {key} in the file")
    return [float(v) for v in values] * (channels // len(values))


def normalisation(folder: Path, arch: str, channels: int = 3) -> dict:
    """The pixel mean / std the model was trained with: preprocessor_config.json's, else transformers'
    default for the family. Images in [0, 1] are fed as (x - mean) / std. A damaged file, or a std of 0
    or a non-finite or ill-sized mean / std (every metric would be NaN), is a ValueError naming the file."""
    path = folder / "preprocessor_config.json"
    if path.is_file():
        p = read_json(path)
        if "image_mean" in p and "image_std" in p:
            return {"image_mean": _pixel_stats(p["image_mean"], "image_mean", channels, path),
                    "image_std": _pixel_stats(p["image_std"], "image_std", channels, path), "from": path.name}
    mean, std = DEFAULT_NORMALISATION[arch]
    return {"image_mean": mean, "image_std": std, "from": f"transformers' default for {arch}"}


def load_pretrained_vit(ref: str, source, image_size: int | None = None, dtype=None):
    """(ViT, config dict) for `load_run("hf:...", task="vit")`; `source` is what `pretrained_vision`
    located. The ViT is built in `dtype` (None: fp32)."""
    import dataclasses

    from ..vit import ViT
    from ..weights import load_state

    hf_cfg = source.config()
    arch = hf_cfg.model_type
    try:
        vit_config(hf_cfg, image_size)  # refuses before the weights are read
    except ValueError as e:
        raise ValueError(f"{source.folder}: {e}") from None
    pixels = normalisation(source.folder, arch, vision_config(hf_cfg).num_channels)
    hf_state = source.weights()  # model/interop/hf_folder.py's checked read
    cfg = vit_config(hf_cfg, image_size, head_of(hf_state, arch))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        model = ViT(cfg)
    finally:
        torch.set_default_dtype(default)
    state = to_sinklab_vit_weights(hf_state, arch)
    check_shapes(model, state, source.config_file)  # a config.json that disagrees with the weights, named
    load_state(model, state, str(source.folder))
    info = {"ref": ref, "name": source.name, "folder": str(source.folder), "path": str(source.folder),
            "format": "transformers", "model_type": arch, **pixels}
    return model, {"task": "vit", "model": dataclasses.asdict(cfg), "hf": info}
