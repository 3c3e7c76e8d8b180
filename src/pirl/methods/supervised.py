"""Supervised training of the same trunk on the images' labels: the upper bound the paper compares with."""

from __future__ import annotations

from torch import nn

from pirl.data import keys
from pirl.errors import PirlError
from pirl.methods.base import BaseMethod, StepOutput, classification


class Supervised(BaseMethod):
    """Cross-entropy of a linear classifier on the pooled trunk features of the image view."""

    name = "supervised"

    def __init__(self, cfg, num_samples: int, num_classes: int = 0) -> None:
        if num_classes < 2:
            raise PirlError(f"method.name=supervised needs labelled images of at least 2 classes; got {num_classes}")
        self.num_classes = num_classes
        super().__init__(cfg, num_samples)

    @classmethod
    def from_source(cls, cfg, num_samples: int, source) -> Supervised:
        labels = source.labels
        if labels is None or max(labels, default=-1) < 0:
            raise PirlError(
                f"method.name=supervised needs labelled images, and {source.name} has no labels "
                "(a folder needs one subfolder per class)"
            )
        return cls(cfg, num_samples, max(max(labels) + 1, source.num_classes))

    def build_heads(self, in_dim: int) -> dict[str, nn.Module]:
        return {"classifier": nn.Linear(in_dim, self.num_classes)}

    def training_step(self, batch, step, encoder=None) -> StepOutput:
        encoder = encoder or self.encoder
        labels = batch[keys.LABEL]
        if bool((labels < 0).any()):  # a partly labelled source: say so rather than fail inside cross_entropy
            index = int(batch[keys.INDEX][labels < 0][0])
            raise PirlError(f"method.name=supervised: training image {index} has no label; every image needs one")
        return classification(encoder({"classifier": batch[keys.IMAGE]})["classifier"], labels)
