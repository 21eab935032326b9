"""Every read of a checkpoint checks its files against manifest.json (sizes, then xxh3-64 content hashes),
not only resume: one flipped byte in model.safetensors (a valid file, loadable, slightly other numbers)
is refused by sample.py, the evals (through runs/load.py) and runs.export_hf in one line naming the file."""
from __future__ import annotations

import os
import shutil

import pytest

import train
from runs.load import load_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run_args):
    os.environ["WANDB_MODE"] = "disabled"
    out = tmp_path_factory.mktemp("hashes")
    assert train.main([*tiny_run_args(1), f"out_dir={out}", "name=r"]) == 0
    return out / "r"


def flipped(trained, tmp_path):
    """A copy of the run whose model.safetensors has one bit of its last tensor byte flipped."""
    run = shutil.copytree(trained, tmp_path / "r", symlinks=True)
    weights = (run / "checkpoints" / "latest").resolve() / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    return run, weights


def test_a_flipped_byte_is_refused_by_every_reader(trained, tmp_path, monkeypatch, capsys):
    import sample
    from eval import sink
    from runs import export_hf

    run, weights = flipped(trained, tmp_path)
    with pytest.raises(ValueError) as e:
        load_run(run)
    assert f"{weights} is damaged (its bytes changed since it was saved" in str(e.value)
    assert "\n" not in str(e.value)
    capsys.readouterr()
    assert sample.main(["--ckpt", str(run), "--max-new-tokens", "2"]) == 2
    assert export_hf.main(["--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 2
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sink.main(["--ckpt", str(run), "--lengths", "16", "--n-seqs", "1", "--device", "cpu"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 3 and all(f"{weights} is damaged" in line for line in err), err
    assert not (tmp_path / "hf").exists() and not (run / "eval").exists()


def test_an_intact_checkpoint_and_one_without_a_manifest_load(trained, tmp_path):
    assert load_run(trained).model is not None
    run = shutil.copytree(trained, tmp_path / "old", symlinks=True)
    (run / "checkpoints" / "latest").resolve().joinpath("manifest.json").unlink()  # written before manifests
    assert load_run(run).model is not None
