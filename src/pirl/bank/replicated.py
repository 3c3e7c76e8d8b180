"""The replicated memory bank: one unit vector per training image, an EMA of its image embedding f.

Negatives are drawn uniformly with replacement (optionally excluding the positive) from a generator reseeded
from ``(seed, step, term)``, so the draw depends on neither the process count nor where a run was resumed.
Under ``torch.distributed`` every rank holds the full bank and applies the same all-gathered update, so the
replicas stay identical; :mod:`pirl.bank.sharded` splits the rows across ranks instead (``bank.kind=sharded``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pirl.bank.kinds import BANK_DTYPE_NAMES
from pirl.bank.scoring import dense_scores, gathered_scores
from pirl.distributed.collectives import all_gather_nograd
from pirl.distributed.collectives import distributed as _distributed
from pirl.seeding import mix_seed

# Storage of the rows (``bank.dtype``). float16 halves the bank's memory and the bytes each gather reads;
# unit vectors lose nothing that matters in it (cosine scores within 5e-4 of float32 ones,
# tests/unit/bank/test_bank.py), and every score, loss and update is still computed in float32.
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
assert tuple(BANK_DTYPES) == BANK_DTYPE_NAMES
# Initial rows are drawn in blocks of this many rows, each from its own seed, so that a rank can draw the rows
# it owns without drawing (and holding) the whole bank.
INIT_BLOCK = 1 << 16


def initial_rows(num_samples: int, dim: int, seed: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of the initial bank: uniform in [-a, a], a = 1 / sqrt(D / 3), then L2-normalised."""
    stop = num_samples if stop is None else stop
    if stop <= start:
        return torch.empty(0, dim)
    bound = 1.0 / (dim / 3) ** 0.5
    blocks = []
    for block in range(start // INIT_BLOCK, (stop - 1) // INIT_BLOCK + 1):
        first = block * INIT_BLOCK
        gen = torch.Generator().manual_seed(mix_seed(seed, 0x8A4C, block))
        drawn = torch.rand(min(INIT_BLOCK, num_samples - first), dim, generator=gen) * (2 * bound) - bound
        blocks.append(drawn[max(start - first, 0) : stop - first])
    return F.normalize(torch.cat(blocks), dim=1)


class MemoryBank(nn.Module):
    """N x D bank of unit vectors, kept in a buffer so that it is part of the model's state dict.

    Args:
        num_samples: rows N, one per training image (the dataset index addresses a row).
        dim: embedding width D.
        momentum: weight of the old row in ``m <- normalize(momentum * m + (1 - momentum) * f)``.
        seed: the initial rows are uniform in [-a, a], a = 1 / sqrt(D / 3), then L2-normalised (as VISSL),
            drawn from this seed so that every process starts from the same bank (:func:`initial_rows`).
        dtype: "float32" or "float16", the storage of the rows (:data:`BANK_DTYPES`).
    """

    # Dense scoring (one B x N x D matmul, then pick columns) beats gathering B x K rows while N <= dense_ratio * K
    # (benchmarks/bank_scoring.py; on 2 CPU cores the crossover for one term is near N / K = 12).
    dense_ratio: float = 12.0
    kind = "replicated"

    def __init__(
        self, num_samples: int, dim: int = 128, momentum: float = 0.5, seed: int = 0, dtype: str = "float32"
    ) -> None:
        super().__init__()
        if dtype not in BANK_DTYPES:
            raise ValueError(f"unknown bank dtype {dtype!r}; choose one of {', '.join(BANK_DTYPES)}")
        self.num_samples, self.dim, self.momentum, self.seed = num_samples, dim, momentum, seed
        self.register_buffer("memory", self._initial_memory().to(BANK_DTYPES[dtype]))

    def _initial_memory(self) -> torch.Tensor:
        return initial_rows(self.num_samples, self.dim, self.seed)

    def full_memory(self) -> torch.Tensor | None:
        """The whole N x D bank for a checkpoint. A collective: call it on every rank (None off rank 0 when sharded)."""
        return self.memory

    def sample_negatives(
        self,
        positives: torch.Tensor,
        k: int,
        step: int,
        term: int,
        *,
        shared: bool = False,
        exclude_positive: bool = False,
        global_batch: int | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Indices of negatives: (B, K), or (K,) when ``shared``.

        The draw is made for the whole ``global_batch`` and rows ``offset:offset + B`` are this rank's, so one
        process and several processes with the same global batch see the same negatives.
        """
        device = self.memory.device
        gen = torch.Generator(device=device).manual_seed(mix_seed(self.seed, step, term))
        if shared:
            return torch.randint(0, self.num_samples, (k,), generator=gen, device=device)
        batch = positives.shape[0]
        high = self.num_samples - 1 if exclude_positive else self.num_samples
        draw = torch.randint(0, high, (global_batch or batch, k), generator=gen, device=device)
        draw = draw[offset : offset + batch]
        if exclude_positive:  # uniform over D \ {I}: shift the indices at or above the positive by one
            draw = draw + (draw >= positives.unsqueeze(1)).long()
        return draw

    def score(self, emb: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Cosine scores (B, 1 + K) in fp32: column 0 against the positive rows, then the negatives."""
        emb = emb.float()
        pos = (emb * self.memory[positives].float()).sum(dim=1, keepdim=True)
        if negatives.dim() == 1:
            neg = emb @ self.memory[negatives].float().T
        elif self.num_samples <= self.dense_ratio * negatives.shape[1]:
            neg = dense_scores(emb, self.memory).gather(1, negatives)
        else:
            neg = gathered_scores(emb, self.memory, negatives)
        return torch.cat([pos, neg], dim=1)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, emb: torch.Tensor) -> None:
        """EMA update of the rows ``indices`` with the unit-norm image embeddings, gathered from all ranks.

        Call it only after the step's scores are computed (the trainer calls it after backward).
        """
        emb = F.normalize(emb.detach().float(), dim=1)
        if _distributed():
            emb, indices = all_gather_nograd(emb), all_gather_nograd(indices)
        self._write(indices, emb)

    def _write(self, rows: torch.Tensor, emb: torch.Tensor) -> None:
        """``m <- normalize(momentum * m + (1 - momentum) * f)`` for the rows ``rows`` of this process's buffer."""
        mixed = self.momentum * self.memory[rows].float() + (1 - self.momentum) * emb
        self.memory.index_copy_(0, rows, F.normalize(mixed, dim=1).to(self.memory.dtype))
