"""BatchNorm over the global batch (``train.sync_bn``): W processes with B / W images each normalise as one
process with B images would, so a multi-process run reproduces a single-process one.

On CUDA this is :class:`torch.nn.SyncBatchNorm`. Its kernels are CUDA-only (in torch 2.14 its forward raises for
CPU tensors and ``torch.batch_norm_stats`` has no CPU kernel), so on CPU :class:`AllReduceBatchNorm` does the same
with two differentiable all-reduces per layer (sum, then squared deviations from the global mean).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pirl.distributed.collectives import all_reduce_sum, distributed


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm of any rank (N, C, ...) whose training statistics are those of the inputs of all processes."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        # Two passes, as a single-process BatchNorm effectively computes the variance: the sum of squared
        # deviations, not E[x^2] - E[x]^2, which would cancel badly.
        totals = all_reduce_sum(torch.cat([x.sum(dims), x.new_tensor([x.numel() / channels])]))
        count = totals[-1].detach()
        mean = totals[:channels] / count
        centred = x - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():  # as F.batch_norm: the unbiased variance goes into the running estimate
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / max(float(count) - 1, 1.0), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Replace every BatchNorm*d of ``module`` by a synchronised one that keeps its parameters and buffers
    (the same tensors: an optimizer built before still updates them; state-dict keys are unchanged)."""
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        new = AllReduceBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device_type))
    return module
