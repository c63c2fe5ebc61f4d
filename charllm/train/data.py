"""Deterministic, fixed-shape token batches: synthetic, or windows of a prepared indexed dataset.

Each sequence follows a seeded random permutation of the vocabulary (token t+1 = perm[token t])
from a random start, so the next token is learnable: a training bug shows as a loss that
does not fall, which pure noise tokens would hide. The batches depend only on the seed, the
data-parallel rank and the micro-batch index, never on tp/pp ranks (those must see the same
data). A small pool is built once and cycled, so no time is spent on data during steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from charllm.errors import CharllmError
from charllm.train.errors import CellConfigError

if TYPE_CHECKING:
    from charllm.train.cell import CellSpec


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


DATASET_DIR_ENV = "CHARLLM_DATASET_DIR"


def dataset_dir(path: str | None, key: str | None, env: dict[str, str] | None = None) -> str:
    """The prepared dataset's directory: ``$CHARLLM_DATASET_DIR`` (set by the job script), else ``path/key``."""
    import os

    env = dict(os.environ) if env is None else env
    if env.get(DATASET_DIR_ENV):
        return env[DATASET_DIR_ENV]
    if not path or not key:
        raise ValueError(f"indexed dataset: neither ${DATASET_DIR_ENV} nor dataset.path and dataset.key are set")
    return os.path.join(os.path.expanduser(path), key)


class IndexedTokenSource:
    """Micro batches of (inputs, targets) cut from a prepared indexed dataset (``charllm.setup.dataprep``).

    The token stream of ``<dir>/tokens.bin`` (all documents back to back, end-of-document ids
    included) is memory-mapped; each row of micro batch ``index`` is a window of ``seq_len + 1``
    tokens whose start is drawn from a generator seeded by (seed, dp rank, index), so the same
    cell reads the same tokens on every run, and tp/pp ranks of one dp rank read the same data.
    """

    def __init__(
        self,
        directory: str,
        vocab_size: int,
        seq_len: int,
        micro_batch: int,
        seed: int,
        dp_rank: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        import json
        import os

        import numpy as np

        from charllm.setup.dataprep import PREFIX, IndexedTokens

        self.ds = IndexedTokens(os.path.join(directory, PREFIX))
        try:
            with open(os.path.join(directory, "manifest.json")) as fh:
                ds_vocab = int(json.load(fh)["tokenizer"]["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            ds_vocab = int(np.max(self.ds.tokens)) + 1 if self.ds.n_tokens else 0
        if ds_vocab > vocab_size:
            raise ValueError(
                f"dataset {directory} has token ids up to {ds_vocab - 1}, but the model's vocabulary has only "
                f"{vocab_size} ids"
            )
        if self.ds.n_tokens < seq_len + 1:
            raise ValueError(
                f"dataset {directory} has {self.ds.n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )
        self.seq_len, self.micro_batch_size, self.seed, self.dp_rank = seq_len, micro_batch, seed, dp_rank
        self.device = torch.device(device)
        self.n_starts = self.ds.n_tokens - seq_len  # valid window starts: 0 .. n_tokens - seq_len - 1
        self._np = np

    def windows(self, index: int) -> torch.Tensor:
        """The (micro_batch, seq_len + 1) token windows of micro batch ``index`` (CPU, int64)."""
        rng = self._np.random.default_rng([self.seed, self.dp_rank, index])
        starts = rng.integers(0, self.n_starts, size=self.micro_batch_size)
        rows = [self._np.asarray(self.ds.tokens[s : s + self.seq_len + 1], dtype=self._np.int64) for s in starts]
        return torch.from_numpy(self._np.stack(rows))

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.windows(index).to(self.device)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def batch(self, step: int, n_micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_micro`` consecutive micro batches stacked along the batch dim (for pipelining)."""
        w = torch.cat([self.windows(step * n_micro + m) for m in range(n_micro)]).to(self.device)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def token_source(cell: CellSpec, dp_rank: int, device: torch.device) -> SyntheticTokens | IndexedTokenSource:
    """The cell's training data for one data-parallel rank (both engines read it this way)."""
    if cell.dataset.kind != "indexed":
        return SyntheticTokens(cell.model.vocab_size, cell.seq_len, cell.micro_batch, cell.seed, dp_rank, device=device)
    try:
        return IndexedTokenSource(
            dataset_dir(cell.dataset.path, cell.dataset.key),
            cell.model.vocab_size,
            cell.seq_len,
            cell.micro_batch,
            cell.seed,
            dp_rank,
            device=device,
        )
    except (ValueError, OSError, CharllmError) as err:
        raise CellConfigError(f"dataset: {err}") from err
