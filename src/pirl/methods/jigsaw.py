"""Jigsaw (Noroozi & Favaro 2016; the Goyal et al. 2019 ResNet version the PIRL paper compares with): the covariant
pretext. The 9 patches are shuffled by one permutation of a fixed set T, and the network says which one.

T is chosen greedily for large Hamming distances between its members (so that no two classes are near
duplicates), deterministically, and saved in every checkpoint, so a run always keeps the classes it began with.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
from torch import nn

from pirl.config.checks import check
from pirl.data import keys
from pirl.data.views import PirlViews
from pirl.errors import PirlError
from pirl.methods.base import BaseMethod, StepOutput, classification
from pirl.models.heads import _projection

# Beyond 9 patches (grid >= 4) the n! orders cannot be enumerated: T is chosen from a seeded random pool instead.
MAX_ENUMERATED = 9
POOL = 100_000


@functools.lru_cache(maxsize=8)
def _hamming_permutations(count: int, n: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    if n <= MAX_ENUMERATED:
        cands = np.array(list(itertools.permutations(range(n))), dtype=np.uint8)
    else:
        pool = max(POOL, 4 * count)
        cands = np.unique(torch.rand(pool, n, generator=gen).argsort(1).numpy().astype(np.uint8), axis=0)
    if count > len(cands):
        raise PirlError(f"method.permutations={count}: only {len(cands)} permutations of {n} patches to choose from")
    # matches[i][v]: which candidates put patch v at position i; the distance to p is n - sum_i matches[i][p[i]].
    # uint8 columns keep each of the |T| passes over the candidates cheap (1000 of 9! take about a second).
    matches = [[(cands[:, i] == v).view(np.uint8) for v in range(n)] for i in range(n)]
    min_dist = np.full(len(cands), n + 1, dtype=np.uint8)
    sum_dist = np.zeros(len(cands), dtype=np.int64)
    same = np.empty(len(cands), dtype=np.uint8)
    chosen = [int(torch.randint(len(cands), (), generator=gen))]
    while True:
        p = cands[chosen[-1]]
        np.copyto(same, matches[0][p[0]])
        for i in range(1, n):
            same += matches[i][p[i]]
        dist = n - same
        np.minimum(min_dist, dist, out=min_dist)  # chosen ones have distance 0 and are never picked again
        sum_dist += dist
        if len(chosen) == count:
            break
        # Farthest point: the largest distance to its nearest chosen permutation; ties go to the largest mean
        # distance to all chosen (Noroozi & Favaro's criterion), then to the first candidate.
        best = np.flatnonzero(min_dist == min_dist.max())
        chosen.append(int(best[np.argmax(sum_dist[best])]))
    return cands[chosen]


def hamming_permutations(count: int, num_patches: int = 9, seed: int = 0) -> torch.Tensor:
    """(count, num_patches) int64: ``count`` distinct permutations chosen greedily for maximal Hamming distance."""
    return torch.from_numpy(_hamming_permutations(count, num_patches, seed).astype(np.int64))


class PermutationHead(nn.Module):
    """Pooled features of the n patches of each image (n*B, C), image-major -> logits over the |T| permutations:
    a projection shared by all patches, their concatenation in the shown order, a linear classifier."""

    def __init__(self, in_dim: int, patch_dim: int, num_patches: int, num_classes: int, mlp: bool, hidden: int) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.patch_proj = _projection(in_dim, patch_dim, mlp, hidden, last_relu=mlp)
        self.classifier = nn.Linear(num_patches * patch_dim, num_classes)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        per_patch = self.patch_proj(patch_features)
        return self.classifier(per_patch.reshape(-1, self.num_patches * per_patch.shape[1]))


class Jigsaw(BaseMethod):
    name = "jigsaw"
    pretext = "jigsaw"

    @classmethod
    def validate(cls, cfg) -> None:
        """The shared ``method.*`` keys, and ``method.permutations`` against the number of patches."""
        super().validate(cfg)
        grid, count = cfg.data.grid, cfg.method.permutations
        most = min(math.factorial(min(grid**2, 10)), 100_000)  # 10! already exceeds the cap
        check(2 <= count <= most, "method.permutations", count, f"must be between 2 and {most:,} for data.grid={grid}")

    def __init__(self, cfg, num_samples: int) -> None:
        super().__init__(cfg, num_samples)
        # A plain CPU tensor, not a buffer: the data views read it, and it stays on the CPU when the model moves.
        self.permutations = hamming_permutations(cfg.method.permutations, cfg.data.grid**2)

    def build_heads(self, in_dim: int) -> dict[str, nn.Module]:
        m = self.cfg.model
        return {
            "jigsaw": PermutationHead(
                in_dim, m.embed_dim, self.cfg.data.grid**2, self.cfg.method.permutations, m.head == "mlp", m.mlp_hidden
            )
        }

    def views(self) -> PirlViews:
        return PirlViews(self.cfg.data, "jigsaw", permutations=self.permutations, image=False)

    def training_step(self, batch, step, encoder=None) -> StepOutput:
        encoder = encoder or self.encoder
        logits = encoder({"jigsaw": batch[keys.PATCHES].flatten(0, 1)})["jigsaw"]  # (B, 9, 3, P, P) -> (9B, ...)
        return classification(logits, batch[keys.PERMUTATION])

    def get_extra_state(self) -> torch.Tensor:
        return self.permutations

    def set_extra_state(self, state: torch.Tensor) -> None:
        if tuple(state.shape) != tuple(self.permutations.shape):
            raise PirlError(
                f"the checkpoint's jigsaw has {state.shape[0]} permutations of {state.shape[1]} patches; "
                f"this config has method.permutations={self.permutations.shape[0]}, "
                f"data.grid={math.isqrt(self.permutations.shape[1])}"
            )
        # In place: the views built before a resume hold this very tensor.
        self.permutations.copy_(state)
