"""Random-window batches that are a pure function of (seed, split, step).

The global batch of a step (micro_batch x processes x accumulation rows) is drawn once from a
generator seeded by that key; micro-step m on rank r takes rows [(m*world + r)*B, +B). So
resuming at any step, or changing the number of processes while keeping the global batch
size (more processes, less accumulation), reproduces exactly the same tokens per step.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val")


def seed_from_key(key: str) -> int:
    """A generator seed that depends on nothing but `key` (no global RNG state)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


class TokenShards:
    """One split of a prepared dataset dir: a read-only memmap of token ids + meta.json."""

    def __init__(self, data_dir: str | Path, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = json.loads((self.data_dir / "meta.json").read_text())
        self.tokens = np.memmap(self.data_dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def __len__(self) -> int:
        return len(self.tokens)


class BatchLoader:
    """(x, y) batches of random windows from one split; y is x shifted left by one token."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, block_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.shards = TokenShards(data_dir, split)
        if len(self.shards) < block_size + 1:
            raise ValueError(
                f"the {split} split of {data_dir} has {len(self.shards)} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}; lower model.block_size or add data"
            )
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
        starts = self._starts(f"{self.seed}/{self.split}/eval", n_windows)
        for i in range(0, n_windows, self.batch_size):
            yield self._rows(starts[i : i + self.batch_size])

    def _starts(self, key: str, n: int) -> list[int]:
        """The first tokens of the n windows drawn for `key`."""
        gen = torch.Generator().manual_seed(seed_from_key(key))
        n_windows = len(self.shards) - self.block_size  # starts leaving room for the shifted target
        return torch.randint(n_windows, (n,), generator=gen).tolist()

    def _batch(self, key: str, slot: int, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [slot*B, (slot+1)*B) of the n_slots*B windows drawn for `key`."""
        starts = self._starts(key, self.batch_size * n_slots)
        return self._rows(starts[slot * self.batch_size : (slot + 1) * self.batch_size])

    def _rows(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.shards.tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
