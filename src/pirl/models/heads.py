"""Projection heads: f for the image view, g for the transformed view.

Linear heads are the paper's; ``mlp=True`` gives VISSL's "SimCLR improvements" heads. ``out_bn=True`` ends
each head with a BatchNorm1d (no affine), which centres the embeddings of a batch: a random ResNet's pooled
features are all positive, so at init every image's embedding shares one large common direction, and with a
memory bank whose rows are up to an epoch old that shared, drifting direction swamps the per-image signal in
short runs. Heads output raw embeddings; the method L2-normalises them.
"""

from __future__ import annotations

import torch
from torch import nn


def _projection(in_dim: int, out_dim: int, mlp: bool, hidden: int, last_relu: bool = False) -> nn.Module:
    if not mlp:
        return nn.Linear(in_dim, out_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
    if last_relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ImageHead(nn.Module):
    """f: pooled trunk feature (B, C) -> embedding (B, D). Also g for the rotation pretext."""

    def __init__(
        self, in_dim: int, out_dim: int = 128, mlp: bool = False, hidden: int = 2048, out_bn: bool = False
    ) -> None:
        super().__init__()
        self.proj = _projection(in_dim, out_dim, mlp, hidden)
        self.out_norm = nn.BatchNorm1d(out_dim, affine=False) if out_bn else nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out_norm(self.proj(features))


class JigsawHead(nn.Module):
    """g: pooled features of the n patches of each image (n*B, C), image-major, -> embedding (B, D).

    A projection shared by all patches, concatenation of the n patch vectors in their (shuffled) order, and a
    second projection of the concatenation. With ``mlp=True`` the shared projection is Linear-ReLU-Linear-ReLU
    (VISSL keeps the last ReLU there).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 128,
        num_patches: int = 9,
        mlp: bool = False,
        hidden: int = 2048,
        out_bn: bool = False,
    ) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.patch_proj = _projection(in_dim, out_dim, mlp, hidden, last_relu=mlp)
        self.concat_proj = nn.Linear(num_patches * out_dim, out_dim)
        self.out_norm = nn.BatchNorm1d(out_dim, affine=False) if out_bn else nn.Identity()

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        per_patch = self.patch_proj(patch_features)  # (n*B, D)
        return self.out_norm(self.concat_proj(per_patch.reshape(-1, self.num_patches * per_patch.shape[1])))
