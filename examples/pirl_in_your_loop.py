"""PIRL's memory bank and loss inside your own plain-PyTorch training loop.

    python examples/pirl_in_your_loop.py FOLDER [--epochs 2] [--size 64]

Only pirl's building blocks are used: the views (image + jigsaw patches), the f and g heads, the memory bank
and the NCE loss. The network, optimiser and loop are ordinary PyTorch and yours to change.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset

import pirl
from pirl.config.schema import DataConfig


class Indexed(Dataset):
    """(views, index): the bank keeps one row per training image, so the loop needs each sample's index."""

    def __init__(self, folder: str, views) -> None:
        self.images = torchvision.datasets.ImageFolder(folder, transform=views)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i][0], i


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="image view size; patches are size // 4")
    parser.add_argument("--lam", type=float, default=0.5, help="weight of the jigsaw term")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    crop = args.size - args.size % 3
    data_cfg = DataConfig(image_size=args.size, jigsaw_crop=crop, patch_size=crop // 3 - 2, augment="light")
    data = Indexed(args.folder, pirl.PirlViews(data_cfg, "jigsaw"))
    loader = DataLoader(data, batch_size=8, shuffle=True, drop_last=True)

    trunk = torchvision.models.resnet18(num_classes=1)
    trunk.fc = torch.nn.Identity()  # pooled 512-d features
    f, g = pirl.ImageHead(512, 128), pirl.JigsawHead(512, 128, num_patches=9)
    bank = pirl.MemoryBank(len(data), dim=128, momentum=0.5)
    params = [*trunk.parameters(), *f.parameters(), *g.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)

    losses, step = [], 0
    for epoch in range(args.epochs):
        for views, idx in loader:
            image, patches = views["image"], views["patches"]  # (B, 3, S, S), (B, 9, 3, P, P)
            v_i = F.normalize(f(trunk(image)), dim=1)
            v_t = F.normalize(g(trunk(patches.flatten(0, 1))), dim=1)
            negatives = bank.sample_negatives(idx, min(64, len(data)), step, 0)
            # Eq. 5 of the paper: both views against the image's bank row, with the same negatives
            loss = args.lam * pirl.info_nce(bank.score(v_t, idx, negatives), 0.07) + (1 - args.lam) * pirl.info_nce(
                bank.score(v_i, idx, negatives), 0.07
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                bank.update(idx, v_i.detach())  # after the step, as in the paper
            losses.append(loss.item())
            step += 1
        print(f"epoch {epoch + 1}: mean loss {sum(losses[-len(loader) :]) / len(loader):.3f}")
    return losses


if __name__ == "__main__":
    main()
