"""PIRL: L = lam * L(m_I, g(v_{I^t})) + (1 - lam) * L(m_I, f(v_I)) (paper Eq. 5), with a jigsaw, rotation or
jigsaw + rotation pretext. NPID++ is the same method with lam = 0 and no transformed view."""

from __future__ import annotations

import torch
from torch import nn

from pirl.data import keys
from pirl.methods.base import Method, StepOutput, unit
from pirl.models.heads import ImageHead, JigsawHead


class PIRL(Method):
    name = "pirl"

    def __init__(self, cfg, num_samples: int) -> None:
        self.pretext = cfg.method.pretext
        super().__init__(cfg, num_samples)

    def build_heads(self, in_dim: int) -> dict[str, nn.Module]:
        m = self.cfg.model
        f = ImageHead(in_dim, m.embed_dim, m.head == "mlp", m.mlp_hidden, m.head_bn)
        if self.pretext == "rotation":
            g: nn.Module = ImageHead(in_dim, m.embed_dim, m.head == "mlp", m.mlp_hidden, m.head_bn)
        else:
            g = JigsawHead(in_dim, m.embed_dim, self.cfg.data.grid**2, m.head == "mlp", m.mlp_hidden, m.head_bn)
        return {"f": f, "g": g}

    def transformed_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pretext == "rotation":
            return batch[keys.ROTATED]
        return batch[keys.PATCHES].flatten(0, 1)  # (B, 9, 3, P, P) -> (9B, 3, P, P), image-major

    def training_step(self, batch, step, encoder=None) -> StepOutput:
        encoder = encoder or self.encoder
        lam, idx = self.cfg.method.lam, batch[keys.INDEX]
        # The transformed view goes first, as in VISSL (it sets the order of the BatchNorm running-stat updates).
        inputs = {"g": self.transformed_input(batch)} if lam > 0 else {}
        inputs["f"] = batch[keys.IMAGE]
        keep = frozenset() if self.cfg.method.transformed_bn_stats else frozenset({"g"})
        emb = encoder(inputs, keep_bn_stats=keep) if keep else encoder(inputs)
        e_img = unit(emb["f"])
        loss_img = self.bank_loss(e_img, idx, step, term=1)
        logs = {"loss_image": loss_img.detach()}
        loss = (1 - lam) * loss_img
        if lam > 0:
            e_t = unit(emb["g"])
            loss_t = self.bank_loss(e_t, idx, step, term=0)
            loss = loss + lam * loss_t
            logs["loss_transformed"] = loss_t.detach()
            logs["sim_f_g"] = (e_img * e_t).sum(1).mean().detach()
        return StepOutput(loss, logs, (idx, e_img.detach()))


class NPID(PIRL):
    """NPID++: the image term alone (lam = 0), no transformed view computed."""

    name = "npid"

    def __init__(self, cfg, num_samples: int) -> None:
        Method.__init__(self, cfg, num_samples)  # no pretext: the class attribute stays None

    def build_heads(self, in_dim: int) -> dict[str, nn.Module]:
        m = self.cfg.model
        return {"f": ImageHead(in_dim, m.embed_dim, m.head == "mlp", m.mlp_hidden, m.head_bn)}

    def training_step(self, batch, step, encoder=None) -> StepOutput:
        encoder = encoder or self.encoder
        e_img = unit(encoder({"f": batch[keys.IMAGE]})["f"])
        loss = self.bank_loss(e_img, batch[keys.INDEX], step, term=1)
        return StepOutput(loss, {"loss_image": loss.detach()}, (batch[keys.INDEX], e_img.detach()))
