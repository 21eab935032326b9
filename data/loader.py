"""Batches that are a pure function of (seed, split, step).

The global batch of a step (micro_batch x processes x accumulation rows) is drawn once from a
generator seeded by that key; micro-step m on rank r takes rows [(m*world + r)*B, +B). So
resuming at any step, or changing the number of processes while keeping the global batch
size (more processes, less accumulation), reproduces exactly the same tokens per step.

Rows are random windows of the token shards; when the data has a BOS token (data.bos) every
window starts at a document start, BOS first, with the following documents packed after it
(as nanochat's BOS-aligned loader). For the synthetic Bigram-Backcopy source the rows are
fresh generated sequences. `make_loader` picks the right loader for a prepared dir.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from . import bigram_backcopy

SPLITS = ("train", "val")


def seed_from_key(key: str) -> int:
    """A generator seed that depends on nothing but `key` (no global RNG state)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


class TokenSplit:
    """One split of a prepared dataset dir (its {split}.bin shard): a read-only memmap of token ids + meta.json."""

    def __init__(self, data_dir: str | Path, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = json.loads((self.data_dir / "meta.json").read_text())
        self.tokens = np.memmap(self.data_dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def __len__(self) -> int:
        return len(self.tokens)


def make_loader(data_dir: str | Path, split: str, batch_size: int, block_size: int, seed: int,
                rank: int = 0, world_size: int = 1, grad_accum: int = 1) -> "KeyedBatches":
    """The batch loader for a prepared dataset dir (what prepare() returned)."""
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    cls = BigramBackcopyLoader if meta["source"] == bigram_backcopy.SOURCE else BatchLoader
    return cls(data_dir, split, batch_size, block_size, seed, rank, world_size, grad_accum)


class KeyedBatches:
    """(x, y) batches, y = x shifted left by one token, drawn from a generator seeded by a key.

    Subclasses say how rows of block_size + 1 tokens are drawn (`_rows`)."""

    bos_id: int | None = None

    def __init__(self, split: str, batch_size: int, block_size: int, seed: int, rank: int, world_size: int,
                 grad_accum: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.split, self.batch_size, self.block_size, self.seed = split, batch_size, block_size, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum

    def get_batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch of `step`, for one micro-step."""
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step must be in [0, {self.grad_accum}), got {micro_step}")
        return self._batch(f"{self.seed}/{self.split}/{step}", micro_step * self.world_size + self.rank,
                           self.world_size * self.grad_accum)

    def eval_windows(self, n_windows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same `n_windows` windows on every call, whatever the batch size, in batches of at
        most batch_size: periodic evals are comparable, and so are runs with other micro batches."""
        gen = torch.Generator().manual_seed(seed_from_key(f"{self.seed}/{self.split}/eval"))
        rows = self._rows(gen, n_windows, slice(None))
        for i in range(0, n_windows, self.batch_size):
            chunk = rows[i : i + self.batch_size]
            yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def _batch(self, key: str, slot: int, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [slot*B, (slot+1)*B) of the n_slots*B rows drawn for `key`."""
        gen = torch.Generator().manual_seed(seed_from_key(key))
        rows = self._rows(gen, self.batch_size * n_slots, slice(slot * self.batch_size, (slot + 1) * self.batch_size))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _rows(self, gen: torch.Generator, n_rows: int, keep: slice) -> torch.Tensor:
        """Draw n_rows rows of block_size + 1 token ids from `gen`; return those in `keep`."""
        raise NotImplementedError


class BatchLoader(KeyedBatches):
    """Random windows of one split's token shards; with a BOS token, windows start at one."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, block_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        super().__init__(split, batch_size, block_size, seed, rank, world_size, grad_accum)
        self.data = TokenSplit(data_dir, split)
        if len(self.data) < block_size + 1:
            raise ValueError(
                f"the {split} split of {data_dir} has {len(self.data)} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}; lower model.block_size or add data"
            )
        n_starts = len(self.data) - block_size  # starts leaving room for the shifted target
        self.bos_id = self.data.meta.get("bos_id")
        self.starts = None  # None: any position; else the document starts (BOS positions)
        if self.bos_id is not None:
            self.starts = np.flatnonzero(np.asarray(self.data.tokens[:n_starts]) == self.bos_id)
            if not len(self.starts):
                raise ValueError(f"the {split} split of {data_dir} has no document start with room for "
                                 f"block_size + 1 = {block_size + 1} tokens; lower model.block_size or add data")

    def _rows(self, gen: torch.Generator, n_rows: int, keep: slice) -> torch.Tensor:
        if self.starts is None:
            starts = torch.randint(len(self.data) - self.block_size, (n_rows,), generator=gen)[keep].tolist()
        else:
            starts = self.starts[torch.randint(len(self.starts), (n_rows,), generator=gen)[keep].numpy()].tolist()
        rows = np.stack([self.data.tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows)


class BigramBackcopyLoader(KeyedBatches):
    """Fresh Bigram-Backcopy sequences of block_size + 1 tokens (BOS first) for every key.

    Train and val differ only in the key: val batches come from seeds training never uses."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, block_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        super().__init__(split, batch_size, block_size, seed, rank, world_size, grad_accum)
        self.chain = bigram_backcopy.load_chain(data_dir)
        self.bos_id = self.chain.bos_id

    def _rows(self, gen: torch.Generator, n_rows: int, keep: slice) -> torch.Tensor:
        # The whole global batch is generated (every row consumes the generator), then sliced.
        return bigram_backcopy.generate(self.chain, n_rows, self.block_size + 1, gen)[keep]
