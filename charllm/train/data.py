"""Synthetic, deterministic, fixed-shape token batches.

Each sequence follows a seeded random permutation of the vocabulary (token t+1 = perm[token t])
from a random start, so the next token is learnable: a training bug shows as a loss that
does not fall, which pure noise tokens would hide. The batches depend only on the seed, the
data-parallel rank and the micro-batch index, never on tp/pp ranks (those must see the same
data). A small pool is built once and cycled, so no time is spent on data during steps.
"""

from __future__ import annotations

import torch


class SyntheticTokens:
    """Micro batches of (inputs, targets), each (micro_batch, seq_len) int64."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        micro_batch: int,
        seed: int,
        dp_rank: int = 0,
        pool: int = 8,
        device: torch.device | str = "cpu",
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(vocab_size, generator=gen)  # the same chain on every rank
        gen_rank = torch.Generator().manual_seed(seed * 7919 + dp_rank + 1)
        n = pool * micro_batch
        seq = torch.empty(n, seq_len + 1, dtype=torch.int64)
        seq[:, 0] = torch.randint(vocab_size, (n,), generator=gen_rank)
        for t in range(seq_len):
            seq[:, t + 1] = perm[seq[:, t]]
        seq = seq.view(pool, micro_batch, seq_len + 1).to(device)
        self.inputs = seq[:, :, :-1].contiguous()
        self.targets = seq[:, :, 1:].contiguous()
        self.pool = pool

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = index % self.pool
        return self.inputs[i], self.targets[i]

    def batch(self, step: int, n_micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_micro`` consecutive micro batches stacked along the batch dim (for pipelining)."""
        idx = [(step * n_micro + m) % self.pool for m in range(n_micro)]
        return self.inputs[idx].flatten(0, 1), self.targets[idx].flatten(0, 1)
