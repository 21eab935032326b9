"""hf: import: tiny random transformers models load into sinklab's GPT with transformers' logits
and greedy tokens; architectures the decoder cannot compute are refused with the reason."""
from __future__ import annotations

import pytest
import torch
from hf_models import ARCHITECTURES, save_tiny

from model import GPT
from model.interop.hf_import import init_model, write_tokenizer
from runs.load import load_run
from model.weights import load_state

TEXT = "Shall I compare thee to a summer's day?"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny(name, root / name) for name in ARCHITECTURES}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_import_matches_transformers(folders, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = folders[name]
    hf = AutoModelForCausalLM.from_pretrained(folder).float().eval()
    run = load_run(f"hf:{folder}")
    cfg = run.model.config
    assert run.config["hf"]["model_type"] == ARCHITECTURES[name][0]
    assert cfg.block_size == (16 if name == "mistral" else 64)  # Mistral stops at its sliding window
    assert run.tokenizer.encode(TEXT).ids == AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]

    T = min(cfg.block_size, 40)
    idx = torch.randint(2, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = run.model(idx).logits, hf(idx).logits.float()
    assert theirs.std() > 0.5  # random weights that give the comparison something to disagree on
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit difference| = {diff:.2e}")
    assert diff < 1e-5

    prompt = idx[:1, :6]
    new = T - 6
    ours = run.model.generate(prompt, new, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=1)
    assert ours.tolist() == theirs.tolist()


def test_init_model_gives_config_weights_and_tokenizer(folders, tmp_path):
    from tokenizers import Tokenizer

    folder = folders["qwen3"]
    path = write_tokenizer(f"hf:{folder}", tmp_path / "tokenizer.json")
    assert Tokenizer.from_file(str(path)).encode(TEXT).ids == load_run(f"hf:{folder}").tokenizer.encode(TEXT).ids
    cfg, state = init_model(f"hf:{folder}")
    assert (cfg.qk_norm, cfg.head_dim, cfg.n_embd, cfg.kv_heads) == (True, 16, 32, 2)
    model = GPT(cfg).eval()
    load_state(model, state, str(folder))
    idx = torch.arange(2, 30)[None]
    with torch.no_grad():
        assert torch.equal(model(idx).logits, load_run(f"hf:{folder}").model(idx).logits)


def test_dtype_and_held_out_text(folders, tmp_path):
    from transformers import AutoTokenizer

    from data.config import DataConfig
    from data.prepare import split_documents
    from data.sources import load_documents

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(5):
        (corpus / f"doc{d}.txt").write_text(f"document {d}: " + TEXT * (d + 1) + "\n")
    folder = folders["llama"]
    run = load_run(f"hf:{folder}", dtype="bf16", data=str(corpus))
    assert {p.dtype for p in run.model.parameters()} == {torch.bfloat16}
    # Reference: transformers' tokenizer on the held-out documents, each with its BOS, then EOS.
    docs = load_documents(DataConfig(source=str(corpus)))
    _, val = split_documents(len(docs), DataConfig.val_fraction, DataConfig.seed)
    tok = AutoTokenizer.from_pretrained(folder)
    expected = [t for i in val for t in tok(docs[i])["input_ids"] + [tok.eos_token_id]]
    assert expected[0] == tok.bos_token_id
    assert run.val_tokens().tolist() == expected
    with pytest.raises(ValueError, match="--data"):
        load_run(f"hf:{folder}").val_tokens()
    with pytest.raises(ValueError, match="dtype='fp8' is not one of"):
        load_run(f"hf:{folder}", dtype="fp8")


def test_sample_cli_generates_from_an_import(folders, capsys):
    import sample

    assert sample.main(["--ckpt", f"hf:{folders['qwen2']}", "--prompt", "Shall", "--max-new-tokens", "5",
                        "--temperature", "0", "--dtype", "fp32", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Shall")


def save_config(folder, arch: str, **fields):
    """A config.json alone: refusals must come before weights or tokenizer are read."""
    from transformers import AutoConfig

    AutoConfig.for_model(arch, **fields).save_pretrained(folder)
    return f"hf:{folder}"


@pytest.mark.parametrize("arch, fields, reason", [
    ("gpt2", {"n_layer": 1}, "model_type 'gpt2': sinklab's decoder lacks learned absolute positions"),
    ("llama", {"mlp_bias": True}, "lacks MLP biases"),
    ("llama", {"attention_bias": True}, "an o_proj bias"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ("qwen3_next", {}, "Gated DeltaNet (linear_attention) layers"),
    ("qwen3_next", {"layer_types": ["full_attention"] * 4, "num_hidden_layers": 4}, "a mixture-of-experts MLP"),
    ("gemma", {}, "a GeGLU MLP"),
])
def test_unrepresentable_models_are_refused(tmp_path, arch, fields, reason):
    ref = save_config(tmp_path, arch, **fields)
    with pytest.raises(ValueError, match="cannot import") as e:
        load_run(ref)
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder, and not a hub id"):
        load_run(f"hf:{tmp_path / 'nothing'}")


def test_new_config_fields_are_checked_and_default_to_the_old_meaning():
    from model import GPTConfig

    cfg = GPTConfig(n_embd=32, n_head=4)
    assert (cfg.head_dim, cfg.attention_bias, cfg.rope_scaling) == (8, False, "none")
    assert GPTConfig(n_embd=30, n_head=4, head_size=16).head_dim == 16  # explicit width: no divisibility needed
    for fields, message in (({"rope_scaling": "yarn"}, "model.rope_scaling='yarn' is not one of"),
                            ({"head_size": 0}, "model.head_size must be null"),
                            ({"n_embd": 30}, "or set model.head_size"),
                            ({"rope_scaling": "llama3", "rope_low_freq_factor": 4.0}, "rope_low_freq_factor <")):
        with pytest.raises(ValueError, match=message):
            GPTConfig(**{"n_embd": 32, "n_head": 4, **fields}).validate()


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_streamed_text_equals_decoding_at_once(kind):
    """sample.py's streaming print: Metaspace (Llama 2 / Mistral) keeps word spaces, byte-level
    holds a multi-byte character back until it is whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from sample import TextStream

    if kind == "metaspace":
        words = ["<unk>", "\u2581the", "\u2581cat", "\u2581sat", "\u2581on", "\u2581mat"]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        prompt, new = tok.encode("the cat").ids, tok.encode("sat on the mat").ids
    else:
        from hf_models import byte_tokenizer

        tok = byte_tokenizer(bos=False).backend_tokenizer
        prompt, new = tok.encode("caf").ids, tok.encode("\u00e9 \u00fcber").ids  # two-byte characters
    stream = TextStream(tok, prompt)
    pieces = [stream.push(t) for t in new]
    assert tok.decode(prompt) + "".join(pieces) + stream.flush() == tok.decode(prompt + new)
    if kind == "metaspace":
        assert pieces[0] == " sat"  # decoding the token alone gives "sat": the word would run on
    else:
        assert pieces[:2] == ["", "\u00e9"]  # é is two bytes: nothing until the second one


def test_an_eval_runs_on_an_import_with_data(folders, tmp_path, monkeypatch):
    """The LM evals take hf: checkpoints: held-out text from --data, results under out/hf/<name>/."""
    from eval import activations

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(4):
        (corpus / f"doc{d}.txt").write_text(TEXT * 4 + "\n")
    monkeypatch.chdir(tmp_path)
    [result] = activations.main(["--ckpt", f"hf:{folders['qwen3']}", "--data", str(corpus), "--n-seqs", "2",
                                 "--length", "32"])
    assert result.checkpoint["path"] == str(folders["qwen3"])
    from model.interop.hf_import import locate

    name = locate(f"hf:{folders['qwen3']}").name
    assert name.startswith("qwen3-")  # the folder's name plus a hash of its path
    assert (tmp_path / "out" / "hf" / name / "eval" / "activations.json").is_file()


def test_sliding_windows_cap_the_context():
    """No sliding-window mask in sinklab: the import's context stops where the window would start."""
    from transformers import AutoConfig

    from model.interop.hf_import import gpt_config

    sizes = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    windowed = AutoConfig.for_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0, **sizes)
    assert gpt_config(windowed).block_size == 16
    assert gpt_config(AutoConfig.for_model("qwen2", sliding_window=16, **sizes)).block_size == 64  # window unused
    assert gpt_config(AutoConfig.for_model("mistral", sliding_window=None, **sizes)).block_size == 64
