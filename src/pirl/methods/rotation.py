"""RotNet (Gidaris et al. 2018), the covariant rotation baseline of the PIRL paper: a linear classifier on the
pooled trunk features says by how much the image view was turned (0, 90, 180 or 270 degrees)."""

from __future__ import annotations

import torch
from torch import nn

from pirl.data import keys
from pirl.methods.base import BaseMethod, StepOutput, classification


def rotate_all(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> all four turns (4B, C, H, W), grouped by turn, and their labels k (turned by k x 90 degrees
    counter-clockwise)."""
    turned = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    if images.is_contiguous(memory_format=torch.channels_last):  # keep the trainer's CUDA layout
        turned = turned.contiguous(memory_format=torch.channels_last)
    return turned, torch.arange(4, device=images.device).repeat_interleave(len(images))


class Rotation(BaseMethod):
    """Each image is shown in all four turns in the same batch (RotNet's best setting). The turn is applied after
    the augmentation: a horizontal flip after a 90-degree turn would look like a 270-degree turn."""

    name = "rotation"

    def build_heads(self, in_dim: int) -> dict[str, nn.Module]:
        return {"rotation": nn.Linear(in_dim, 4)}

    def training_step(self, batch, step, encoder=None) -> StepOutput:
        encoder = encoder or self.encoder
        images, labels = rotate_all(batch[keys.IMAGE])
        return classification(encoder({"rotation": images})["rotation"], labels)
