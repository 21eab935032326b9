"""runs/import_onnx_dinov2.py: a DINOv2 exported to ONNX (named norms and biases, each linear weight an
anonymous MatMul operand stored transposed, the position table split in two) becomes a transformers
folder with the original weights, whatever order the initializers come in."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runs import import_onnx_dinov2 as conv

pytestmark = pytest.mark.usefixtures("single_thread")
LINEARS = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
           "attention.output.dense", "mlp.fc1", "mlp.fc2")


def hub_state(model) -> dict[str, np.ndarray]:
    """The model's weights under the hub checkpoints' names (what an export of it is named after)."""
    import tempfile

    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return load_file(f"{d}/model.safetensors")


def tiny_model():
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16,
                       mlp_ratio=2)
    torch.manual_seed(0)
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def exported_graph(state: dict, prefix: str = "backbone."):
    """An ONNX graph holding `state` as the exporter stores it: MatMul(x, W^T) + bias per linear, the
    position table as an anonymous CLS row and patch table, a head's tensors beside the backbone; the
    anonymous initializers in shuffled order so that only the graph says which is which."""
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes, anon = [], [], []
    for name, value in state.items():
        layer_linear = any(name.endswith(f"{lin}.weight") for lin in LINEARS)
        if layer_linear or name in ("embeddings.position_embeddings", "embeddings.mask_token"):
            continue
        inits.append(numpy_helper.from_array(value, prefix + name))
    pos = state["embeddings.position_embeddings"]
    anon += [("onnx::Concat_1", pos[:, :1]), ("onnx::Reshape_2", pos[:, 1:])]
    n = 10
    for name in state:
        if any(name.endswith(f"{lin}.weight") for lin in LINEARS):
            mm, out = f"onnx::MatMul_{n}", f"/mm_{n}"
            anon.append((mm, np.ascontiguousarray(state[name].T)))
            bias = prefix + name.removesuffix(".weight") + ".bias"
            nodes += [helper.make_node("MatMul", [f"/in_{n}", mm], [out]),
                      helper.make_node("Add", [bias, out] if n % 2 else [out, bias], [f"/add_{n}"])]
            n += 1
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(anon)):
        inits.append(numpy_helper.from_array(anon[i][1], anon[i][0]))
    inits.append(numpy_helper.from_array(np.ones((3, 3), np.float32), "decoder.conv.weight"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    return helper.make_model(graph)


def test_mapping_from_initializers_alone():
    """Without onnx: the mapping of a synthetic initializer dict and its {bias: MatMul weight} pairs."""
    state = hub_state(tiny_model())
    inits = {f"backbone.{k}": v for k, v in state.items()
             if not any(k.endswith(f"{lin}.weight") for lin in LINEARS) and k != "embeddings.position_embeddings"}
    inits["onnx::Concat_7"] = state["embeddings.position_embeddings"][:, :1]
    inits["onnx::Reshape_9"] = state["embeddings.position_embeddings"][:, 1:]
    inits["decoder.bn.weight"] = np.ones(3, np.float32)
    linears = {f"backbone.{k.removesuffix('.weight')}.bias": v.T for k, v in state.items()
               if any(k.endswith(f"{lin}.weight") for lin in LINEARS)}
    got, fields, left_out = conv.dinov2_state(inits, linears)
    assert set(got) == set(state) and left_out == ["decoder"]
    for k, v in state.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert fields == {"hidden_size": 128, "num_hidden_layers": 2, "patch_size": 4, "image_size": 16,
                      "num_channels": 3, "mlp_ratio": 2}


def test_convert_an_exported_graph_gives_back_the_model(tmp_path):
    pytest.importorskip("onnx")
    import onnx
    from transformers import Dinov2Model

    model = tiny_model()
    state = hub_state(model)
    onnx.save(exported_graph(state), tmp_path / "m.onnx")
    summary = conv.convert(tmp_path / "m.onnx", tmp_path / "out")
    assert summary["left_out"] == ["decoder"] and summary["config"]["num_attention_heads"] == 2  # 128 / 64
    back = Dinov2Model.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x).last_hidden_state, model(x).last_hidden_state, rtol=0, atol=0)
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folder left


def test_cli_refuses_an_existing_out_and_a_missing_file(tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "out").mkdir()
    for argv, msg in ((["--onnx", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "o2")], "is not a file"),
                      (["--onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "out")], "exists")):
        with pytest.raises(SystemExit) as e:
            conv.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
