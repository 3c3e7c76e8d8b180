"""ResNet trunks from torchvision, with an optional small-image stem and per-stage features; other backbones
from timm (``arch="timm:<model name>"``, pooled features only).

The trunk *is* the torchvision model with ``fc`` replaced by ``nn.Identity``: its ``state_dict`` keys are the
bare torchvision keys (minus ``fc``), so exported weights load into ``torchvision.models.<arch>()`` directly.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from pirl.errors import PirlError
from pirl.models.archs import ARCHS, STAGES, STEMS, TIMM_PREFIX, is_timm_arch

__all__ = ["ARCHS", "STAGES", "STEMS", "TIMM_PREFIX", "build_trunk", "feature_dim", "is_timm_arch", "stage_features"]


def _timm_trunk(name: str) -> nn.Module:
    """A timm backbone without classifier: forward gives the pooled (N, num_features) features the heads take."""
    try:
        import timm
    except ImportError:
        raise PirlError(f"model.arch={TIMM_PREFIX}{name} needs timm: pip install 'pirl[timm]'") from None
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception as err:  # unknown model name and the like
        raise PirlError(f"cannot build timm model {name!r} ({str(err).splitlines()[0][:200]})") from None
    model.pirl_timm = True  # a plain attribute: not in the state dict
    return model


def build_trunk(arch: str = "resnet50", stem: str = "imagenet") -> nn.Module:
    """Build a randomly initialised torchvision ResNet whose forward returns pooled res5 features.

    ``stem="cifar"`` replaces conv1 by a 3x3 stride-1 conv (padding 1, no bias) and removes the max-pool,
    the usual stem for 32-pixel inputs.
    ``arch="timm:<name>"`` builds that timm model with ``num_classes=0`` (timm's own key names); only the
    ImageNet stem and pooled features apply to it.
    """
    if is_timm_arch(arch):
        if stem != "imagenet":
            raise PirlError(f"model.stem={stem} is for torchvision ResNets; timm trunks keep their own stem")
        return _timm_trunk(arch[len(TIMM_PREFIX) :])
    if arch not in ARCHS:
        raise PirlError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise PirlError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def feature_dim(trunk: nn.Module) -> int:
    """Width of the pooled res5 feature (512 for ResNet-18/34, 2048 for the bottleneck ResNets; timm's
    ``num_features`` for a timm trunk)."""
    if getattr(trunk, "pirl_timm", False):
        # the pooled width: after a pre-logits layer (MobileNetV3's conv_head) it is head_hidden_size
        return int(getattr(trunk, "head_hidden_size", None) or trunk.num_features)
    last_block = trunk.layer4[-1]
    return getattr(last_block, "bn3", getattr(last_block, "bn2", None)).num_features


def stage_features(trunk: nn.Module, x: torch.Tensor, stages: tuple[str, ...] = STAGES) -> dict[str, torch.Tensor]:
    """Feature maps (N, C, H, W) after conv1 (post ReLU/max-pool), res2, res3, res4 and res5, plus ``pool``."""
    if getattr(trunk, "pirl_timm", False):
        if set(stages) - {"pool"}:
            raise PirlError(
                "per-layer features (conv1 ... res5) need a torchvision ResNet trunk; "
                "a timm trunk gives pooled features only (--stage pool)"
            )
        return {"pool": trunk(x)}
    out: dict[str, torch.Tensor] = {}
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
    out["conv1"] = x
    for name, layer in zip(STAGES[1:], (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)):
        x = layer(x)
        out[name] = x
        if set(stages) <= set(out):
            break
    if "pool" in stages:
        out["pool"] = torch.flatten(trunk.avgpool(out["res5"]), 1)
    return {k: v for k, v in out.items() if k in stages}
