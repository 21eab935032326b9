"""Bigram-Backcopy (Guo et al. 2024, "Active-Dormant Attention Heads"): a synthetic task where
attention sinks form in a one-layer transformer within a few hundred steps.

Every sequence starts with BOS. The first token is drawn from the corpus's character unigram
(triggers excluded), then each next token follows the character bigram chain of the embedded
corpus, except after a trigger (one of the `n_triggers` most frequent characters), where the
token before the trigger is copied. Predicting after a non-trigger needs no attention at all,
so the copy head learns to park those queries on BOS: the sink this lab wants to measure.

Sequences are generated fresh for every step from a generator seeded by (seed, split, step),
so the loader keeps the contract of data/loader.py. The chain is estimated once in prepare()
and stored in the prepared dir as chain.npz; the tokenizer is character-level.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models

from .tokenizer import BOS

SOURCE = "bigram_backcopy"
CHAIN_FILE = "chain.npz"


@dataclass
class Chain:
    """The data-generating process: bigram rows, first-token law, trigger ids and BOS id."""

    chars: list[str]  # token id i < len(chars) is chars[i]; BOS is the last id
    bigram: np.ndarray  # (C, C) row-stochastic: P(next char | char)
    first: np.ndarray  # (C,) law of the token after BOS: the unigram without triggers
    triggers: np.ndarray  # ids of the n most frequent characters
    unigram: np.ndarray  # (C,) character frequencies of the corpus

    @property
    def bos_id(self) -> int:
        return len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1


def estimate_chain(docs: list[str], n_triggers: int) -> Chain:
    """Character unigram and bigram counts over `docs` (pairs never cross a document end)."""
    chars = sorted(set("".join(docs)))
    if n_triggers >= len(chars):
        raise ValueError(f"data.n_triggers={n_triggers} must be below the number of characters ({len(chars)})")
    index = {c: i for i, c in enumerate(chars)}
    counts = np.zeros((len(chars), len(chars)), dtype=np.float64)
    unigram = np.zeros(len(chars), dtype=np.float64)
    for doc in docs:
        ids = np.fromiter((index[c] for c in doc), dtype=np.int64, count=len(doc))
        np.add.at(counts, (ids[:-1], ids[1:]), 1.0)
        unigram += np.bincount(ids, minlength=len(chars))
    unigram /= unigram.sum()
    rows = counts.sum(1, keepdims=True)
    # A character only ever seen last in a document has no successor: fall back to the unigram.
    bigram = np.where(rows > 0, counts / np.maximum(rows, 1.0), unigram)
    triggers = np.sort(np.argsort(-unigram, kind="stable")[:n_triggers])
    first = unigram.copy()
    first[triggers] = 0.0
    return Chain(chars, bigram, first / first.sum(), triggers, unigram)


def save_chain(chain: Chain, out: Path) -> None:
    np.savez(out / CHAIN_FILE, chars=np.array(chain.chars), bigram=chain.bigram, first=chain.first,
             triggers=chain.triggers, unigram=chain.unigram)


def load_chain(data_dir: str | Path) -> Chain:
    with np.load(Path(data_dir) / CHAIN_FILE) as f:
        return Chain([str(c) for c in f["chars"]], f["bigram"], f["first"], f["triggers"], f["unigram"])


def char_tokenizer(chars: list[str]) -> Tokenizer:
    """One token per character, `<|bos|>` last; decode(encode(s)) == s for text over `chars`."""
    vocab = {c: i for i, c in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges and no pre-tokenizer: characters
    tok.add_special_tokens([BOS])
    tok.decoder = decoders.Fuse()
    if tok.token_to_id(BOS) != len(chars):
        raise RuntimeError(f"{BOS} must come right after the characters in the vocabulary")
    return tok


def generate(chain: Chain, n_rows: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(n_rows, length) sequences: BOS, a first character, then bigram steps or back-copies."""
    out = torch.empty(n_rows, length, dtype=torch.long)
    out[:, 0] = chain.bos_id
    if length == 1:
        return out
    # Inverse-CDF sampling from one uniform per row and step: a pure function of `gen`.
    u = torch.rand(length, n_rows, generator=gen, dtype=torch.float64)
    first_cdf = torch.from_numpy(np.cumsum(chain.first))
    cdf = torch.from_numpy(np.cumsum(chain.bigram, axis=1))
    is_trigger = torch.zeros(chain.vocab_size, dtype=torch.bool)
    is_trigger[torch.from_numpy(chain.triggers)] = True
    last = len(chain.chars) - 1
    out[:, 1] = torch.searchsorted(first_cdf, u[1]).clamp_(max=last)
    for t in range(2, length):
        prev = out[:, t - 1]
        step = torch.searchsorted(cdf[prev], u[t].unsqueeze(1)).squeeze(1).clamp_(max=last)
        out[:, t] = torch.where(is_trigger[prev], out[:, t - 2], step)
    return out


def optimal_nll(chain: Chain, seqs: torch.Tensor) -> float:
    """Mean NLL (nats/token) of the true process on the targets seqs[:, 1:]: the loss floor.

    Copies after a trigger are certain (0 nats); the first character pays its unigram law."""
    prev, nxt = seqs[:, 1:-1], seqs[:, 2:]
    bigram = torch.from_numpy(chain.bigram)
    is_trigger = torch.from_numpy(np.isin(np.arange(chain.vocab_size), chain.triggers))
    step = -torch.log(bigram[prev, nxt])
    nll = torch.where(is_trigger[prev], torch.zeros_like(step), step)
    first = -torch.log(torch.from_numpy(chain.first)[seqs[:, 1]])
    return float((nll.sum() + first.sum()) / (seqs.shape[0] * (seqs.shape[1] - 1)))
