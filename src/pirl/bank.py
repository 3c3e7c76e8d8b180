"""The memory bank: one unit vector per training image, an EMA of its image embedding f.

Negatives are drawn uniformly with replacement (optionally excluding the positive) from a generator reseeded
from ``(seed, step, term)``, so the draw depends on neither the process count nor where a run was resumed.
Under ``torch.distributed`` every rank holds the full bank and applies the same all-gathered update, so the
replicas stay identical; :mod:`pirl.bank_sharded` splits the rows across ranks instead (``loss.bank=sharded``).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from pirl.collectives import all_gather_nograd
from pirl.collectives import distributed as _distributed

BANK_KINDS = ("replicated", "sharded")
# Storage of the rows (``loss.bank_dtype``). float16 halves the bank's memory and the bytes each gather reads;
# unit vectors lose nothing that matters in it (cosine scores within 5e-4 of float32 ones, tests/test_bank.py),
# and every score, loss and update is still computed in float32.
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Initial rows are drawn in blocks of this many rows, each from its own seed, so that a rank can draw the rows
# it owns without drawing (and holding) the whole bank.
INIT_BLOCK = 1 << 16


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers: different tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
        blocks.append(drawn[max(start - first, 0):stop - first])
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

    def __init__(self, num_samples: int, dim: int = 128, momentum: float = 0.5, seed: int = 0,
                 dtype: str = "float32") -> None:
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

    def sample_negatives(self, positives: torch.Tensor, k: int, step: int, term: int, *, shared: bool = False,
                         exclude_positive: bool = False, global_batch: int | None = None,
                         offset: int = 0) -> torch.Tensor:
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
        draw = draw[offset:offset + batch]
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


# Rows per piece of the CPU gather: 2 MB of fp32 rows at D = 128, which stays in a core's cache.
GATHER_PIECE = 4096


class _GatheredScores(torch.autograd.Function):
    """``s[b, k] = memory[negatives[b, k]] . emb[b]`` without keeping the B x K x D gathered rows.

    Forward copies the rows piece by piece into one small reused buffer and scores each piece while it is in
    cache: on the CPU a fresh B x K x D tensor (134 MB at B = 64, K = 4,096) costs more in page faults than the
    copy itself, and it was read twice more (product, backward). Backward is one fused ``embedding_bag``:
    ``d emb[b] = sum_k grad[b, k] memory[negatives[b, k]]`` (for a float16 bank on the CPU, the pieces again,
    widened: the CPU kernel would sum in float16). The bank gets no gradient; saving it lets autograd
    refuse a backward after the bank was updated in place.
    """

    @staticmethod
    def forward(ctx, emb: torch.Tensor, memory: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        batch, k = negatives.shape
        ctx.save_for_backward(memory, negatives)
        if emb.device.type != "cpu":  # one gather and one product: the allocator caches, the launches count
            rows = memory.index_select(0, negatives.reshape(-1)).view(batch, k, -1)
            return torch.bmm(rows.to(emb.dtype), emb.unsqueeze(2)).squeeze(2)
        scores = emb.new_empty(batch, k)
        for b, start, rows in _pieces(memory, negatives, emb.dtype):
            torch.mv(rows, emb[b], out=scores[b, start:start + len(rows)])
        return scores

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        memory, negatives = ctx.saved_tensors
        batch, k = negatives.shape
        grad = grad.contiguous()
        if memory.dtype == grad.dtype or grad.device.type != "cpu":  # CUDA's embedding_bag sums in float32
            offsets = torch.arange(0, batch * k, k, device=negatives.device)
            # weights in the bank's dtype: a float16 bank gets each row scaled to a largest |weight| of 1,
            # which keeps the small ones (about 1 / K each) out of float16's subnormal range
            weights, scale = grad, None
            if memory.dtype != grad.dtype:
                scale = grad.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                weights = (grad / scale).to(memory.dtype)
            grad_emb = F.embedding_bag(negatives.reshape(-1), memory, offsets, mode="sum",
                                       per_sample_weights=weights.reshape(-1)).to(grad.dtype)
            return (grad_emb if scale is None else grad_emb * scale), None, None
        # a float16 bank on the CPU, whose embedding_bag would sum in float16: widen the rows piece by piece
        grad_emb = grad.new_zeros(batch, memory.shape[1])
        for b, start, rows in _pieces(memory, negatives, grad.dtype):
            grad_emb[b].addmv_(rows.T, grad[b, start:start + len(rows)])
        return grad_emb, None, None


def _pieces(memory: torch.Tensor, negatives: torch.Tensor, dtype: torch.dtype):
    """(sample, first column, rows) for pieces of at most GATHER_PIECE rows of ``memory[negatives[b]]``, copied
    into one reused buffer (widened to ``dtype`` through a second one when the bank is stored narrower)."""
    batch, k = negatives.shape
    piece = min(k, GATHER_PIECE)
    buffer = memory.new_empty(piece, memory.shape[1])
    widened = buffer if memory.dtype == dtype else buffer.new_empty(piece, memory.shape[1], dtype=dtype)
    for b in range(batch):
        for start in range(0, k, piece):
            stop = min(start + piece, k)
            rows = buffer[:stop - start]
            torch.index_select(memory, 0, negatives[b, start:stop], out=rows)
            if widened is not buffer:
                rows = widened[:stop - start].copy_(rows)
            yield b, start, rows


def dense_scores(emb: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Scores (B, N) of float32 embeddings against every bank row; a float16 bank is widened for the product
    on the CPU (no fast half matmul there) and multiplied in half precision, accumulating in float32, on a GPU."""
    if memory.dtype == emb.dtype:
        return emb @ memory.T
    if emb.device.type == "cpu":
        return emb @ memory.float().T
    return (emb.to(memory.dtype) @ memory.T).float()


def gathered_scores(emb: torch.Tensor, memory: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Scores (B, K) of embeddings ``emb`` (B, D) against their own rows ``memory[negatives]`` (``negatives``: B x K)."""
    return _GatheredScores.apply(emb, memory, negatives)


def build_bank(kind: str, num_samples: int, dim: int = 128, momentum: float = 0.5, seed: int = 0,
               dtype: str = "float32") -> MemoryBank:
    """``kind``: "replicated" (every rank holds all N rows) or "sharded" (rank r holds a contiguous N/W block);
    ``dtype``: the rows' storage, "float32" or "float16"."""
    if kind == "sharded":
        from pirl.bank_sharded import ShardedMemoryBank

        return ShardedMemoryBank(num_samples, dim, momentum, seed, dtype=dtype)
    if kind != "replicated":
        raise ValueError(f"unknown bank kind {kind!r}; choose one of {', '.join(BANK_KINDS)}")
    return MemoryBank(num_samples, dim, momentum, seed, dtype)
