"""Scores of embeddings against bank rows: dense (every row, then pick columns) and gathered (only the rows
asked for, without materialising them), for float32 and float16 banks.

Each has a GPU path and a CPU path, chosen by the embeddings' device (:func:`fused_path`) unless the caller
names one: both compute the same scores, and naming the path lets the tests check the GPU arithmetic on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per piece of the CPU gather: 2 MB of fp32 rows at D = 128, which stays in a core's cache.
GATHER_PIECE = 4096


def fused_path(device: torch.device) -> bool:
    """Whether scoring on ``device`` takes the fused path (one gather and one batched product; a fused
    ``embedding_bag`` backward; half-precision products): on every device but the CPU."""
    return device.type != "cpu"


class _GatheredScores(torch.autograd.Function):
    """``s[b, k] = memory[negatives[b, k]] . emb[b]`` without keeping the B x K x D gathered rows.

    Forward copies the rows piece by piece into one small reused buffer and scores each piece while it is in
    cache: on the CPU a fresh B x K x D tensor (134 MB at B = 64, K = 4,096) costs more in page faults than the
    copy itself, and it was read twice more (product, backward). Backward is one fused ``embedding_bag``:
    ``d emb[b] = sum_k grad[b, k] memory[negatives[b, k]]`` (for a float16 bank on the CPU, the pieces again,
    widened: the CPU kernel would sum in float16). The bank gets no gradient; saving it lets autograd
    refuse a backward after the bank was updated in place. ``fused`` takes the GPU path instead: one gather
    and one batched product, where the allocator caches and the kernel launches count.
    """

    @staticmethod
    def forward(ctx, emb: torch.Tensor, memory: torch.Tensor, negatives: torch.Tensor, fused: bool) -> torch.Tensor:
        batch, k = negatives.shape
        ctx.save_for_backward(memory, negatives)
        ctx.fused = fused
        if fused:
            rows = memory.index_select(0, negatives.reshape(-1)).view(batch, k, -1)
            return torch.bmm(rows.to(emb.dtype), emb.unsqueeze(2)).squeeze(2)
        scores = emb.new_empty(batch, k)
        for b, start, rows in _pieces(memory, negatives, emb.dtype):
            torch.mv(rows, emb[b], out=scores[b, start : start + len(rows)])
        return scores

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        memory, negatives = ctx.saved_tensors
        batch, k = negatives.shape
        grad = grad.contiguous()
        if memory.dtype == grad.dtype or ctx.fused:  # CUDA's embedding_bag sums in float32
            offsets = torch.arange(0, batch * k, k, device=negatives.device)
            # weights in the bank's dtype: a float16 bank gets each row scaled to a largest |weight| of 1,
            # which keeps the small ones (about 1 / K each) out of float16's subnormal range
            weights, scale = grad, None
            if memory.dtype != grad.dtype:
                scale = grad.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                weights = (grad / scale).to(memory.dtype)
            grad_emb = F.embedding_bag(
                negatives.reshape(-1), memory, offsets, mode="sum", per_sample_weights=weights.reshape(-1)
            )
            # a float16 bank's sum comes back to float32 through the (float32) scale
            return (grad_emb if scale is None else grad_emb * scale), None, None, None
        # a float16 bank on the CPU, whose embedding_bag would sum in float16: widen the rows piece by piece
        grad_emb = grad.new_zeros(batch, memory.shape[1])
        for b, start, rows in _pieces(memory, negatives, grad.dtype):
            grad_emb[b].addmv_(rows.T, grad[b, start : start + len(rows)])
        return grad_emb, None, None, None


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
            rows = buffer[: stop - start]
            torch.index_select(memory, 0, negatives[b, start:stop], out=rows)
            if widened is not buffer:
                rows = widened[: stop - start].copy_(rows)
            yield b, start, rows


def dense_scores(emb: torch.Tensor, memory: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """Scores (B, N) of float32 embeddings against every bank row; a float16 bank is widened for the product
    on the CPU (no fast half matmul there) and multiplied in half precision, accumulating in float32, on a GPU
    (or wherever ``fused`` is true)."""
    if memory.dtype == emb.dtype:
        return emb @ memory.T
    if not (fused_path(emb.device) if fused is None else fused):
        return emb @ memory.float().T
    return (emb.to(memory.dtype) @ memory.T).float()


def gathered_scores(
    emb: torch.Tensor, memory: torch.Tensor, negatives: torch.Tensor, fused: bool | None = None
) -> torch.Tensor:
    """Scores (B, K) of embeddings ``emb`` (B, D) against their rows ``memory[negatives]`` (``negatives``: B x K);
    ``fused`` names the path (default: :func:`fused_path` of the embeddings' device)."""
    return _GatheredScores.apply(emb, memory, negatives, fused_path(emb.device) if fused is None else fused)
