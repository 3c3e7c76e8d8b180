"""What every method shares: an encoder (trunk + heads), the views it trains on, and (for PIRL and NPID++) the
memory bank and its loss.

A method is one short subclass that says which views it needs, builds its heads, and turns a batch into a
loss. :class:`BaseMethod` has no bank (the covariant pretext tasks and the supervised baseline);
:class:`Method` adds the bank. The trainer only calls :meth:`BaseMethod.training_step`,
:meth:`BaseMethod.after_step` and :meth:`BaseMethod.parameter_groups`, and checkpoints ``state_dict()``;
export keeps the ``encoder.trunk.`` weights alone, so every method exports the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pirl import losses
from pirl.bank.build import build_bank
from pirl.bank.replicated import MemoryBank
from pirl.config.checks import check, choice
from pirl.config.schema import Config
from pirl.data.views import PirlViews
from pirl.models.trunk import build_trunk, feature_dim


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    # (indices, image embeddings) to write into the bank once the optimizer step is done
    bank_update: tuple[torch.Tensor, torch.Tensor] | None = None


class Encoder(nn.Module):
    """Trunk plus named heads; the part of a method that has gradients (and that DDP wraps)."""

    def __init__(self, trunk: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)

    def forward(
        self, inputs: dict[str, torch.Tensor], keep_bn_stats: frozenset[str] = frozenset()
    ) -> dict[str, torch.Tensor]:
        """``inputs`` maps a head name to the images it embeds; images of a head go through the trunk as one batch.

        The passes of the heads named in ``keep_bn_stats`` normalise with their batch statistics as usual but leave
        the BatchNorm running statistics as they were.
        """
        out = {}
        for name, x in inputs.items():
            with bn_running_stats_frozen(self.trunk, name in keep_bn_stats):
                out[name] = self.heads[name](self.trunk(x))
        return out


@contextlib.contextmanager
def bn_running_stats_frozen(module: nn.Module, frozen: bool = True) -> Iterator[None]:
    """Within the block, training-mode BatchNorm layers of ``module`` use batch statistics but do not update their
    running estimates (momentum 0: running = running); restored on exit, also on error."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if frozen else []
    saved = [
        (m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in layers
    ]
    try:
        for m in layers:
            m.momentum = 0.0
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class BankLoss(nn.Module):
    """The contrastive loss of an embedding against its bank row (positive) and K bank rows (negatives).

    Holds the NCE normaliser Z (``log_z``), estimated once from the first batch it sees and checkpointed.
    """

    def __init__(self, form: str, temperature: float, num_samples: int) -> None:
        super().__init__()
        self.form, self.temperature, self.num_samples = form, temperature, num_samples
        self.register_buffer("log_z", torch.tensor(float("nan")))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if self.form == "infonce":
            return losses.info_nce(scores, self.temperature)
        if self.form == "paper_nce":
            return losses.paper_nce(scores, self.temperature)
        if torch.isnan(self.log_z):
            z = losses.estimate_log_z(scores, self.temperature, self.num_samples).exp()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(z)
                z /= dist.get_world_size()
            self.log_z.copy_(z.log())
        return losses.npid_nce(scores, self.temperature, self.log_z, self.num_samples)


class BaseMethod(nn.Module):
    """Base of every method: builds the trunk and the heads from the config; no memory bank (``bank`` is None)."""

    name = "base"
    pretext: str | None = None
    PRETEXTS = ("jigsaw", "rotation", "jigsaw_rotation")

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """Check the ``method.*`` keys (config loading calls this on the chosen method's class). Every method checks
        the shared ones, whether it reads them or not; a method with keys of its own extends this."""
        mc = cfg.method
        choice("method.pretext", mc.pretext, cls.PRETEXTS)
        check(0 <= mc.lam <= 1, "method.lam", mc.lam, "must be in [0, 1]")

    def __init__(self, cfg: Config, num_samples: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_samples = num_samples
        trunk = build_trunk(cfg.model.arch, cfg.model.stem)
        if cfg.model.init:
            from pirl.interop import load_initial_weights

            load_initial_weights(trunk, cfg.model.init)
        self.encoder = Encoder(trunk, self.build_heads(feature_dim(trunk)))
        self.bank: MemoryBank | None = None  # an instance attribute, so that code can ask ``method.bank is None``
        # set by the trainer under torch.distributed: this rank's rows of the global batch
        self.global_batch: int | None = None
        self.batch_offset = 0

    @classmethod
    def from_source(cls, cfg: Config, num_samples: int, source) -> BaseMethod:
        """Build for a given :class:`~pirl.data.sources.ImageSource`; a method that needs its labels overrides this."""
        return cls(cfg, num_samples)

    def build_heads(self, in_dim: int) -> dict[str, nn.Module]:
        raise NotImplementedError

    def views(self) -> PirlViews:
        return PirlViews(self.cfg.data, self.pretext)

    def training_step(self, batch: dict[str, torch.Tensor], step: int, encoder: nn.Module | None = None) -> StepOutput:
        """The loss of one batch; ``encoder`` is the (possibly DDP-wrapped or compiled) ``self.encoder``."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, out: StepOutput) -> None:
        """Called after the optimizer step; nothing to do without a bank."""

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """SGD groups: weight decay on conv and linear weights only, not on BatchNorm parameters or biases."""
        decay, no_decay = [], []
        for p in self.encoder.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Method(BaseMethod):
    """Base of the bank-based methods (PIRL, NPID++): adds the memory bank and its loss."""

    def __init__(self, cfg: Config, num_samples: int) -> None:
        super().__init__(cfg, num_samples)
        self.bank = build_bank(
            cfg.bank.kind, num_samples, cfg.model.embed_dim, cfg.bank.momentum, cfg.train.seed, cfg.bank.dtype
        )
        self.criterion = BankLoss(cfg.loss.form, cfg.loss.temperature, num_samples)

    def bank_loss(self, emb: torch.Tensor, indices: torch.Tensor, step: int, term: int) -> torch.Tensor:
        """Loss of unit-norm embeddings against their bank rows and freshly drawn negatives (one draw per term)."""
        bc = self.cfg.bank
        k = min(bc.negatives, self.num_samples - 1 if bc.exclude_positive else self.num_samples)
        negatives = self.bank.sample_negatives(
            indices,
            k,
            step,
            term,
            shared=bc.share_negatives,
            exclude_positive=bc.exclude_positive,
            global_batch=self.global_batch,
            offset=self.batch_offset,
        )
        with torch.autocast(device_type=emb.device.type, enabled=False):  # the loss maths stays in fp32
            return self.criterion(self.bank.score(emb.float(), indices, negatives))

    @torch.no_grad()
    def init_bank_from_features(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``bank.init=features``: set each row to the untrained network's f of its un-augmented image.

        ``batches`` yields (images, row indices); under torch.distributed every process must yield the same
        number of equally sized batches (the update all-gathers them, so each process can embed a slice).
        BatchNorm uses batch statistics, as in training, and its running statistics are left untouched.
        """
        norms = [m for m in self.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
        was_training, momentum = self.encoder.training, self.bank.momentum
        self.encoder.train()
        self.bank.momentum = 0.0  # the update then writes the embedding itself
        try:
            for images, rows in batches:
                self.bank.update(rows, unit(self.encoder({"f": images})["f"]))
        finally:
            self.bank.momentum = momentum
            self.encoder.train(was_training)
            for m, state in zip(norms, saved):
                m.load_state_dict(state)

    @torch.no_grad()
    def after_step(self, out: StepOutput) -> None:
        """Write the step's image embeddings into the bank (after the scores and the optimizer step)."""
        if out.bank_update is not None:
            self.bank.update(*out.bank_update)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=1)


def classification(logits: torch.Tensor, targets: torch.Tensor) -> StepOutput:
    """Cross-entropy (in fp32, as every loss here) and the batch accuracy, logged as ``acc``."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        loss = F.cross_entropy(logits.float(), targets)
    acc = (logits.detach().argmax(1) == targets).float().mean()
    return StepOutput(loss, {"acc": acc})
