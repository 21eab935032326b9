"""Data preparation that never trains on stale or damaged data: path expansion, fingerprints,
cache validation, concurrent and interrupted builds, one-line errors, bounded memory and
pretrained tokenizers. Each test reproduces a failure of the earlier prepare() first."""
import fcntl
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from data import DataConfig, load_tokenizer, prepare, train_tokenizer
from data.prepare import check_fingerprint, dataset_key, fingerprint, main, validate_prepared

prep = importlib.import_module("data.prepare")  # the module; `data.prepare` is the function
ROOT = Path(__file__).resolve().parents[1]
LINE = "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune\n"


def write_corpus(folder: Path, n: int = 8, salt: str = "") -> Path:
    """n distinct small .txt documents in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}{salt}.\n" + LINE * (10 + 3 * i) + f"{salt} end {i}\n")
    return folder


def tmp_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name) if root.exists() else []


def decoded_documents(out: Path, split: str) -> list[str]:
    meta = json.loads((out / "meta.json").read_text())
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
    text = load_tokenizer(out).decode(ids, skip_special_tokens=False)
    return [d for d in text.split(meta["eos_token"]) if d]


def test_tilde_source_and_tokenizer_are_expanded_and_hashed(tmp_path, monkeypatch):
    """data.source=~/corp used to skip the content hash (the unexpanded path 'did not exist'),
    so a replaced corpus reused the stale cache."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_corpus(tmp_path / "corp")
    cfg = DataConfig(source="~/corp", vocab_size=300, cache_dir="~/cache")
    first = prepare(cfg, progress=False)
    assert first.parent == tmp_path / "cache" and not (Path.cwd() / "~").exists()
    for f in (tmp_path / "corp").iterdir():
        f.unlink()
    write_corpus(tmp_path / "corp", salt=" replaced")
    second = prepare(cfg, progress=False)
    assert second != first
    assert all("replaced" in d for d in decoded_documents(second, "train") + decoded_documents(second, "val"))
    # The same corpus named by its absolute path is the same dataset.
    assert dataset_key(DataConfig(source=str(tmp_path / "corp"), vocab_size=300)) == second.name

    # A tokenizer named with ~: its content is part of the key too.
    load_tokenizer(first).save(str(tmp_path / "tok.json"))
    with_tok = DataConfig(source="~/corp", tokenizer="~/tok.json", cache_dir="~/cache")
    key = dataset_key(with_tok)
    train_tokenizer(["zebras and quartz " * 50], vocab_size=280).save(str(tmp_path / "tok.json"))
    assert dataset_key(with_tok) != key
    assert prepare(with_tok, progress=False).name == dataset_key(with_tok)


def test_fingerprint_names_a_retrained_tokenizer(tmp_path):
    """One document added re-trains the tokenizer and remaps ids; resuming must refuse."""
    corpus = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(source=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    before = prepare(cfg, progress=False)
    saved = fingerprint(before)
    check_fingerprint(saved, fingerprint(before))  # unchanged data: no error
    # The same data prepared into another cache dir has the same fingerprint.
    check_fingerprint(saved, fingerprint(prepare(replace(cfg, cache_dir=str(tmp_path / "c2")), progress=False)))

    (corpus / "extra.txt").write_text("An added document about zebras, quartz and jukeboxes. " * 30)
    after = prepare(cfg, progress=False)
    old, new = load_tokenizer(before).get_vocab(), load_tokenizer(after).get_vocab()
    remapped = sum(1 for token, i in old.items() if new.get(token) != i)
    assert remapped > 0  # the failure being guarded against: the same id now means another token
    with pytest.raises(ValueError, match=r"tokenizer_sha256 [0-9a-f]{12} -> [0-9a-f]{12}.*train_tokens.*new run") as e:
        check_fingerprint(saved, fingerprint(after))
    assert "\n" not in str(e.value) and before.name in str(e.value) and after.name in str(e.value)


def test_damaged_cache_is_rebuilt_never_used(tmp_path, capsys):
    """A truncated train.bin was used as is (46% of the data); a damaged meta.json was a traceback."""
    cfg = DataConfig(source=str(write_corpus(tmp_path / "corpus")), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    out = prepare(cfg, progress=False)
    good = {f: (out / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json", "tokenizer.json")}

    damages = {
        "truncated train.bin": ("train.bin", good["train.bin"][: int(0.46 * len(good["train.bin"])) // 2 * 2],
                                r"train.bin has \d+ bytes, but meta.json says \d+ tokens x 2 bytes"),
        "damaged meta.json": ("meta.json", b'{"format_version": 2, "dtyp', r"meta.json is unreadable"),
        "meta.json without counts": ("meta.json", json.dumps({"format_version": 2}).encode(), r"lacks \['dtype'"),
        "another tokenizer": ("tokenizer.json", good["tokenizer.json"].replace(b'"<|endoftext|>"', b'"<|eot|>"'),
                              "tokenizer.json is missing or is not the tokenizer"),
    }
    for what, (name, content, message) in damages.items():
        (out / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            validate_prepared(out)
        capsys.readouterr()
        assert prepare(cfg, progress=False) == out, what
        err = capsys.readouterr().err
        assert f"the cached dataset {out} is damaged" in err and "rebuilding it" in err, what
        assert {f: (out / f).read_bytes() for f in good if f != "meta.json"} == \
            {f: v for f, v in good.items() if f != "meta.json"}, what
        assert validate_prepared(out)["train_tokens"] == len(good["train.bin"]) // 2, what
    assert tmp_dirs(out.parent) == []


def test_concurrent_prepares_never_delete_a_finished_dir(tmp_path, monkeypatch):
    """The earlier prepare() removed an existing dataset dir before its rename, so a slower
    process deleted the finished dir another one was reading."""
    cfg = DataConfig(source=str(write_corpus(tmp_path / "corpus")), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    read_documents = prep.iter_documents
    builds, building, release = [], threading.Event(), threading.Event()

    def paused_documents(c):  # the first build pauses after one document until released
        builds.append(threading.current_thread().name)
        for i, doc in enumerate(read_documents(c)):
            if i == 1 and len(builds) == 1:
                building.set()
                assert release.wait(60)
            yield doc

    monkeypatch.setattr(prep, "iter_documents", paused_documents)
    results = {}
    workers = [threading.Thread(target=lambda n=n: results.setdefault(n, prepare(cfg, progress=False)), name=n)
               for n in ("first", "second")]
    workers[0].start()
    assert building.wait(60)
    workers[1].start()
    time.sleep(0.5)  # the second is now waiting for the lock (or has not reached it yet)
    release.set()
    for w in workers:
        w.join(60)
    assert builds == ["first"] and results["first"] == results["second"]
    out = results["first"]
    validate_prepared(out)
    assert tmp_dirs(out.parent) == []

    # A builder that does not share our lock (another host) finishes first: its complete dir is
    # kept, we discard only our own temp dir.
    out.rename(tmp_path / "finished-elsewhere")
    inode = (tmp_path / "finished-elsewhere" / "meta.json").stat().st_ino
    builds.clear()
    release.clear()
    racer = threading.Thread(target=lambda: results.update(third=prepare(cfg, progress=False)))
    building.clear()
    racer.start()
    assert building.wait(60)
    (tmp_path / "finished-elsewhere").rename(out)
    release.set()
    racer.join(60)
    assert results["third"] == out and (out / "meta.json").stat().st_ino == inode
    assert tmp_dirs(out.parent) == []


SLOW_PREPARE = """
import importlib, sys, time
prep = importlib.import_module("data.prepare")
read = prep.iter_documents
def slow(cfg):
    for doc in read(cfg):
        time.sleep(0.2)
        yield doc
prep.iter_documents = slow
prep.prepare(prep.DataConfig(source=sys.argv[1], vocab_size=300, cache_dir=sys.argv[2]), progress=False)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_prepare_removes_its_temp_dir(tmp_path, sig):
    """SIGTERM used to kill prepare with its temp dir left behind forever."""
    corpus, cache = write_corpus(tmp_path / "corpus", n=200), tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(corpus), str(cache)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not tmp_dirs(cache) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert tmp_dirs(cache), f"the build never started: {proc.poll() is None or proc.communicate()[1]}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"{sig.name} during data preparation" in err and "Traceback" not in err
    assert tmp_dirs(cache) == [] and not [p for p in cache.iterdir() if p.is_dir()]


def test_stale_temp_dirs_are_removed_unless_locked(tmp_path):
    """Temp dirs of a killed build (SIGKILL) were never cleaned and filled the disk."""
    cfg = DataConfig(source=str(write_corpus(tmp_path / "corpus")), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    cache, key = tmp_path / "cache", dataset_key(cfg)
    cache.mkdir()
    for stale in (f".{key}.tmp-killed", ".other-key.tmp-killed", ".busy-key.tmp-live"):
        (cache / stale).mkdir()
        (cache / stale / "train.bin").write_bytes(b"\0" * 1000)
    with open(cache / ".busy-key.lock", "a") as lock:  # a live process building "busy-key"
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = prepare(cfg, progress=False)
        assert tmp_dirs(cache) == [".busy-key.tmp-live"]
        # A prepare served from the cache cleans up too.
        (cache / ".other-key.tmp-killed").mkdir()
        assert prepare(cfg, progress=False) == out and tmp_dirs(cache) == [".busy-key.tmp-live"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ValueError, match=r"data.cache_dir=.*file is a file, not a directory; set data.cache_dir"):
        prepare(DataConfig(source=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "file" / "cache")))

    cache = tmp_path / "cache"
    cases = {
        "missing source": (["--source", str(tmp_path / "nowhere")], "data.source="),
        "vocab size": (["--source", str(corpus), "--vocab-size", "10"], "data.vocab_size must be an integer >= 257"),
        "missing tokenizer": (["--source", str(corpus), "--tokenizer", str(tmp_path / "nope.json")],
                              "data.tokenizer="),
    }
    for what, (argv, message) in cases.items():
        with pytest.raises(SystemExit) as e:
            main([*argv, "--cache-dir", str(cache), "--no-progress"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, (what, err)
        assert not cache.exists(), what


MEASURE_PEAK = """
import importlib, sys
prep = importlib.import_module("data.prepare")
def prepare(source, cache):
    return prep.prepare(prep.DataConfig(source=source, vocab_size=300, cache_dir=cache), progress=False)
prepare(sys.argv[1], sys.argv[3])  # warm-up on a small corpus: lazy imports, allocator pools
before_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
out = prepare(sys.argv[2], sys.argv[3])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (here pytest).
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(before_kb, peak_kb, prep.validate_prepared(out)["train_tokens"])
"""


def write_jsonl(path: Path, n_docs: int, seed: int = 0) -> Path:
    """n_docs ~1 kB documents of Zipf-distributed words over a 3000-word vocabulary."""
    rng = np.random.default_rng(seed)
    words = np.array(["".join(rng.choice(list("abcdefghij"), rng.integers(2, 8))) for _ in range(3000)])
    with open(path, "w") as f:
        for _ in range(n_docs // 1000):
            rows = words[rng.zipf(1.3, size=(1000, 160)) % len(words)]
            f.write("".join(json.dumps({"text": " ".join(r) + "."}) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_streamed_prepare_memory_is_bounded(tmp_path):
    """The corpus used to be held in RAM (as Python strings and an Arrow table) while tokenising:
    on this test's 20 MB jsonl corpus of 24k documents main's prepare grew the peak RSS by
    103 MB after a warm-up.

    Now documents stream through a spool file and the shards are written chunk by chunk: the
    peak RSS growth stays below the corpus size (7 MB measured), i.e. the text is never held
    in memory even once.
    """
    small, big = write_jsonl(tmp_path / "small.jsonl", 2000, seed=1), write_jsonl(tmp_path / "big.jsonl", 24000)
    size_kb = big.stat().st_size // 1024
    assert size_kb > 20_000
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(small), str(big), str(tmp_path / "cache")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    before_kb, peak_kb, train_tokens = map(int, res.stdout.split())
    assert train_tokens > 1_000_000
    assert peak_kb - before_kb < size_kb, f"peak RSS grew by {peak_kb - before_kb} kB for a {size_kb} kB corpus"


def test_pretrained_tokenizer_folder_or_file(tmp_path):
    """data.tokenizer accepts a transformers save_pretrained folder (the hub-id code path) and
    a bare tokenizer.json; documents end with the tokenizer's EOS, no template BOS is added."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    corpus = write_corpus(tmp_path / "corpus")
    tok = train_tokenizer([LINE * 20], vocab_size=300)
    tok.add_special_tokens(["<s>", "</s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path / "hf")
    cfg = DataConfig(source=str(corpus), tokenizer=str(tmp_path / "hf"), cache_dir=str(tmp_path / "cache"))
    out = prepare(cfg, progress=False)
    meta = validate_prepared(out)
    assert meta["eos_token"] == "</s>" and meta["eot_id"] == tok.token_to_id("</s>")
    train = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    docs = decoded_documents(out, "train")
    expected = [i for d in docs for i in [*tok.encode(d, add_special_tokens=False).ids, meta["eot_id"]]]
    assert train.tolist() == expected and bos not in train and len(docs) == meta["train_documents"]

    bare = replace(cfg, tokenizer=str(tmp_path / "hf" / "tokenizer.json"))
    assert validate_prepared(prepare(bare, progress=False))["eos_token"] == "<|endoftext|>"
