"""Sinks at any position: which key each head attends to most, and which kinds of token take
the attention. Sink_1 only looks at the first token; a sink that forms on a delimiter (or that
moves when there is no BOS, Guo et al. 2024) is found here.

The measure is position-agnostic: the share of a sequence's attention that key j receives,
share_j = 1/T * sum_i A_ij (each of the T queries spreads one unit over the keys it sees, so
the shares over j sum to 1). For j = 0 this is alpha_1. A late key can only be seen by the
queries after it, so it cannot look like a sink by accident (share_{T-1} <= 1/T).
"""
from __future__ import annotations

import string
from collections import Counter

import torch

CLASSES = ("bos/end-of-text", "newline", "punctuation", "other")
N_TOP_TOKENS = 10


def key_share(a: torch.Tensor) -> torch.Tensor:
    """(L, B, H, T, T) attention -> (L, B, H, T): share of all attention each key receives."""
    return a.mean(dim=-2)


def token_class(text: str, special: bool) -> str:
    if special:
        return "bos/end-of-text"
    if text and not text.strip() and "\n" in text:
        return "newline"
    if text.strip() and all(c in string.punctuation for c in text.strip()):
        return "punctuation"
    return "other"


def classify_vocab(tokenizer, vocab_size: int, special_ids=()) -> tuple[list[str], list[str]]:
    """(class, decoded text) per token id; special = the given ids and the tokenizer's special tokens."""
    special = set(special_ids)
    if tokenizer is not None and hasattr(tokenizer, "get_added_tokens_decoder"):
        special |= {i for i, t in tokenizer.get_added_tokens_decoder().items() if getattr(t, "special", True)}
    texts = [tokenizer.decode([i], skip_special_tokens=False) if tokenizer is not None else "" for i in range(vocab_size)]
    return [token_class(t, i in special) for i, t in enumerate(texts)], texts


class PositionStats:
    """Accumulates, over batches, the most-attended key per (layer, head) and the attention per token id."""

    def __init__(self, vocab_size: int, eps: float):
        self.vocab_size, self.eps = vocab_size, eps
        self.argmax_pos, self.argmax_tok, self.max_share = [], [], []
        self.mass_by_token = torch.zeros(vocab_size, dtype=torch.float64)
        self.count_by_token = torch.zeros(vocab_size, dtype=torch.float64)
        self.n_seqs = 0

    def add(self, a: torch.Tensor, ids: torch.Tensor) -> None:
        """a: (L, B, H, T, T) on any device; ids: (B, T) the tokens of the batch."""
        share = key_share(a).cpu()  # (L, B, H, T)
        ids = ids.cpu().long()
        best, pos = share.max(dim=-1)  # (L, B, H)
        L, B, H = pos.shape
        self.max_share.append(best)
        self.argmax_pos.append(pos)
        self.argmax_tok.append(ids.gather(1, pos.permute(1, 0, 2).reshape(B, L * H)).view(B, L, H).permute(1, 0, 2))
        per_token = share.mean(dim=(0, 2))  # (B, T): mean over layers and heads
        self.mass_by_token.index_add_(0, ids.flatten(), per_token.flatten().double())
        self.count_by_token.index_add_(0, ids.flatten(), torch.ones(ids.numel(), dtype=torch.float64))
        self.n_seqs += B

    def sink_any(self) -> float:
        """% of (sequence, layer, head) whose most-attended key has share > eps, wherever it is."""
        return float((torch.cat(self.max_share, 1) > self.eps).float().mean() * 100)

    def top_keys(self) -> list[list[dict]]:
        """Per [layer][head]: the most frequent most-attended position and token, and the mean share."""
        pos, tok, share = (torch.cat(x, 1) for x in (self.argmax_pos, self.argmax_tok, self.max_share))
        L, N, H = pos.shape
        out = []
        for l in range(L):
            row = []
            for h in range(H):
                p, p_n = Counter(pos[l, :, h].tolist()).most_common(1)[0]
                t, t_n = Counter(tok[l, :, h].tolist()).most_common(1)[0]
                row.append({"position": p, "position_share": p_n / N, "token_id": t, "token_share": t_n / N,
                            "mass": float(share[l, :, h].mean())})
            out.append(row)
        return out

    def by_class(self, classes: list[str]) -> dict:
        """Per token class: share of all attention it receives, and its share of the token positions."""
        total_mass, total_count = self.mass_by_token.sum(), self.count_by_token.sum()
        out = {}
        for c in CLASSES:
            member = torch.tensor([cl == c for cl in classes[: self.vocab_size]])
            out[c] = {"attention": float(self.mass_by_token[member].sum() / total_mass),
                      "tokens": float(self.count_by_token[member].sum() / total_count)}
        return out

    def top_tokens(self, texts: list[str], n: int = N_TOP_TOKENS) -> list[dict]:
        """The token ids receiving the most attention in all (share of all attention, occurrences)."""
        total = self.mass_by_token.sum()
        vals, ids = self.mass_by_token.topk(min(n, self.vocab_size))
        return [{"token_id": int(i), "text": texts[int(i)] if texts else "", "attention": float(v / total),
                 "occurrences": int(self.count_by_token[i])} for v, i in zip(vals, ids) if v > 0]
