"""hf:<GGUF file>: tiny random Llama / Qwen2 models written as quantised GGUF files by the test
(tests/gguf_models.py) import with the logits of the transformers model that transformers' GGUF
loader builds from the same file; the quantisation lands in every eval JSON; hf: output dirs of
different local models never collide. Nothing is downloaded."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from gguf_models import GGUF_ARCHITECTURES, save_tiny_gguf

from model.interop.hf_import import locate
from runs.load import load_run

TEXT = "Shall I compare thee to a summer's day?"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {name: save_tiny_gguf(name, root / name / f"tiny-{name}.gguf") for name in GGUF_ARCHITECTURES}


@pytest.mark.parametrize("name", list(GGUF_ARCHITECTURES))
def test_gguf_import_matches_transformers_gguf_loader(files, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = files[name]
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    run = load_run(f"hf:{path}")
    info = run.config["hf"]
    assert (info["model_type"], info["format"]) == (GGUF_ARCHITECTURES[name][0], "gguf")
    quant = GGUF_ARCHITECTURES[name][2]
    assert info["quantization"]["type"] == quant and info["quantization"]["tensor_types"][quant] > 0
    assert run.checkpoint == path.resolve()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert run.tokenizer.encode(TEXT).ids == tok(TEXT)["input_ids"]

    idx = torch.randint(2, run.model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = run.model(idx).logits, hf(idx).logits.float()
    assert theirs.std() > 0.5  # random weights that give the comparison something to disagree on
    diff = (ours - theirs).abs().max().item()
    print(f"{name} ({quant}): max |logit difference| = {diff:.2e}")
    assert diff < 1e-5
    # The quantisation changed the function: the unquantised transformers folder the file was made from differs.
    original = AutoModelForCausalLM.from_pretrained(path.parent / f"{path.stem}_transformers").float().eval()
    with torch.no_grad():
        assert (original(idx).logits - theirs).abs().max().item() > 1e-3


def test_a_folder_holding_one_gguf_imports_it_and_several_are_refused(files, tmp_path):
    path = files["qwen2"]
    assert locate(f"hf:{path.parent}").gguf == path.resolve()  # its transformers twin is a sibling folder, not inside
    shutil.copy(path, tmp_path / "a.gguf")
    shutil.copy(path, tmp_path / "b.gguf")
    with pytest.raises(FileNotFoundError, match="2 .gguf files"):
        locate(f"hf:{tmp_path}")


def test_eval_json_records_the_quantisation(files, tmp_path, monkeypatch):
    from eval import sink

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(5):
        (corpus / f"doc{d}.txt").write_text(f"document {d}: " + TEXT * 8 + "\n")
    monkeypatch.chdir(tmp_path)  # out/hf/... lands here
    path = files["llama"]
    (result,) = sink.main(["--ckpt", f"hf:{path}", "--data", str(corpus), "--lengths", "16", "--n-seqs", "2",
                           "--device", "cpu"])
    out = tmp_path / "out" / "hf" / locate(f"hf:{path}").name / "eval" / "sink.json"
    record = json.loads(out.read_text())["checkpoint"]
    assert record["quantization"]["type"] == "Q8_0" and record["format"] == "gguf"
    assert record["path"] == str(path.resolve()) and record["ref"] == f"hf:{path}"


def test_hf_output_dirs_of_two_local_models_never_collide(files, tmp_path):
    """hf:/a/hf and hf:/b/hf used to both write out/hf/hf/eval/."""
    a, b = tmp_path / "a" / "hf", tmp_path / "b" / "hf"
    for folder in (a, b):
        folder.mkdir(parents=True)
        shutil.copy(files["llama"], folder / "model.gguf")
    dirs = {load_run(f"hf:{folder}").run_dir for folder in (a, b)}
    assert len(dirs) == 2 and all(d.name.startswith("model-") for d in dirs)
    assert load_run(f"hf:{a}").run_dir == load_run(f"hf:{a}/model.gguf").run_dir  # one model, one dir


def test_an_eight_k_import_defaults_to_a_short_eval_context(files):
    from runs.load import IMPORT_EVAL_CONTEXT

    run = load_run(f"hf:{files['llama']}")
    run.model.config.block_size = 8192  # as SmolLM2's context
    assert run.eval_block_size == IMPORT_EVAL_CONTEXT == 256


def test_unsupported_gguf_architecture_is_refused_in_one_line(tmp_path):
    import gguf

    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="cannot import") as e:
        load_run(f"hf:{path}")
    assert "\n" not in str(e.value) and "phi2" in str(e.value)
    print(e.value)


def test_a_missing_gguf_file_is_named_not_looked_up_on_the_hub():
    with pytest.raises(FileNotFoundError, match="models/none.gguf: no such GGUF file"):
        locate("hf:models/none.gguf")  # owner/name-shaped, but a file name: no hub lookup


def test_sample_cli_generates_from_a_gguf_file(files, capsys):
    import sample

    assert sample.main(["--ckpt", f"hf:{files['qwen2']}", "--prompt", "Shall", "--max-new-tokens", "5",
                        "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Shall")
