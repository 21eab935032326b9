"""The fixed held-out windows that the in-training probes and the evals read."""
from __future__ import annotations

import numpy as np
import torch


def held_out_sequences(tokens, n_seqs: int, length: int, bos_id: int | None = None) -> torch.Tensor:
    """(n, length) LongTensor of consecutive, non-overlapping windows from the start of the
    held-out token stream: deterministic, so two runs on the same data see the same text.
    Fewer than n_seqs come back when the stream is short (at least one is required).
    With `bos_id`, each row is BOS followed by a window of length - 1 tokens."""
    tokens = np.asarray(tokens)
    body = length - (bos_id is not None)
    n = min(n_seqs, len(tokens) // body) if body > 0 else 0
    if n < 1:
        raise ValueError(f"held-out data has {len(tokens)} tokens, fewer than one sequence of {length}")
    rows = torch.from_numpy(tokens[: n * body].astype(np.int64).reshape(n, body))
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows
