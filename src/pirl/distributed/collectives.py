"""Collectives that gradients flow through, for CPU (gloo) and CUDA (NCCL) alike.

``torch.distributed.nn.functional`` has similar functions, but its all_gather falls back to a list all_to_all
that gloo lacks and its all_reduce is deprecated; these use only the collectives both backends have.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd import Function


def distributed() -> bool:
    """True under an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # every rank's loss depends on every rank's input: the input's gradient is the sum of all of them
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


class _AllGather(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # a reduce-scatter (which gloo lacks): send block r to rank r, then sum what every rank sent back
        world = dist.get_world_size()
        grad = grad.contiguous()
        received = torch.empty_like(grad)
        dist.all_to_all_single(received, grad)
        return received.view(world, -1, *grad.shape[1:]).sum(0)


class _AllToAll(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.send, ctx.recv = send, recv
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv)
        return out, None, None


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; the gradient of the input is the sum of the output's gradients on every rank."""
    return _AllReduceSum.apply(x)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's ``x`` (same shape on every rank) along dim 0, rank order."""
    return _AllGather.apply(x)


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    """Rows ``x`` cut into blocks of ``send[r]`` rows go to rank r; returns the blocks received, rank order."""
    return _AllToAll.apply(x, send, recv)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather` for indices and detached values."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
