"""Weights in and out: torchvision and timm weights as a starting point, VISSL checkpoints in, Detectron2 and
timm layouts out.

Every trunk here keeps the bare torchvision ResNet keys (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...,
no ``fc``), so each conversion is a key rename and nothing else.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pirl.errors import PirlError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
EXPORT_FORMATS = ("torchvision", "detectron2", "timm")

# torchvision weight enums (``ResNet50_Weights``) and the arch they belong to
_WEIGHT_ENUMS = {
    "ResNet18_Weights": "resnet18",
    "ResNet34_Weights": "resnet34",
    "ResNet50_Weights": "resnet50",
    "ResNet101_Weights": "resnet101",
    "Wide_ResNet50_2_Weights": "wide_resnet50_2",
}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def _without_fc(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def torchvision_weights(spec: str) -> tuple[str, Any]:
    """(arch, weights enum member) for ``ResNet50_Weights.IMAGENET1K_V2`` (or with a ``torchvision:`` prefix)."""
    import torchvision

    name = spec.removeprefix("torchvision:")
    enum_name = name.split(".", 1)[0]
    if enum_name not in _WEIGHT_ENUMS or "." not in name:
        raise PirlError(
            f"unknown torchvision weights {name!r}; use e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2 "
            f"({', '.join(_WEIGHT_ENUMS)})"
        )
    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        members = ", ".join(f"{enum_name}.{m}" for m in getattr(torchvision.models, enum_name).__members__)
        raise PirlError(f"unknown torchvision weights {name!r}; choose one of {members}") from None
    return _WEIGHT_ENUMS[enum_name], weights


def torchvision_state_dict(spec: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(arch, trunk weights) of torchvision weights; the file comes from torch.hub's cache (downloaded if absent)."""
    arch, weights = torchvision_weights(spec)
    try:
        state = weights.get_state_dict(progress=False, weights_only=True)
    except Exception as err:  # no network, a damaged cache file, ...
        raise PirlError(
            f"cannot load torchvision weights {spec} ({_first_line(err)}); put the file "
            f"{weights.url.rsplit('/', 1)[-1]} in $TORCH_HOME/hub/checkpoints"
        ) from None
    return arch, _without_fc(state)


def timm_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Pretrained weights of a timm model (``timm:resnet50.a1_in1k``), classifier removed."""
    try:
        import timm
    except ImportError:
        raise PirlError("timm weights need timm: pip install 'pirl[timm]'") from None
    name = name.removeprefix("timm:")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:
        raise PirlError(f"cannot load timm model {name!r} ({_first_line(err)})") from None
    return _without_fc(model.state_dict())


def saved_trunk_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Trunk weights of a pirl export directory, a run directory or a checkpoint file."""
    from pirl.checkpoint import load_export, open_checkpoint, trunk_state_dict

    path = Path(path)
    if (path / "model.safetensors").is_file():
        return load_export(path)[0].state_dict()
    return trunk_state_dict(open_checkpoint(path)[1])


def initial_state_dict(spec: str) -> dict[str, torch.Tensor]:
    """Weights named by ``model.init``: ``torchvision:<enum>``, ``timm:<name>`` or a path to an export/checkpoint."""
    if spec.startswith("torchvision:"):
        return torchvision_state_dict(spec)[1]
    if spec.startswith("timm:"):
        return timm_state_dict(spec)
    return saved_trunk_state_dict(spec)


def load_initial_weights(trunk: nn.Module, spec: str) -> None:
    """Load ``model.init`` weights into ``trunk``; every trunk tensor must be matched, in name and shape."""
    state = initial_state_dict(spec)
    own = trunk.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        first = (wrong or missing)[0]
        detail = (
            f"{first} is {tuple(state[first].shape)}, the trunk has {tuple(own[first].shape)}"
            if wrong
            else f"{first} is missing"
        )
        raise PirlError(
            f"model.init={spec} does not fit model.arch/model.stem: {len(missing)} missing and "
            f"{len(wrong)} mis-shaped tensors ({detail})"
        )
    trunk.load_state_dict({k: state[k] for k in own})


def check_init(spec: str) -> str | None:
    """Why ``model.init`` cannot work, before any training starts (None when it looks usable)."""
    if not spec or spec.startswith("timm:"):
        return None
    if spec.startswith("torchvision:"):
        try:
            torchvision_weights(spec)  # the name only: nothing is downloaded here
        except PirlError as err:
            return str(err)
        return None
    if not Path(spec).exists():
        return "must be torchvision:<weights enum>, timm:<model name> or an existing export, run or checkpoint"
    return None


# --- VISSL checkpoints in -------------------------------------------------------------------------------------


def _vissl_trunk(state: Any) -> dict[str, torch.Tensor]:
    """The trunk's tensors from a VISSL checkpoint, however deeply nested, with the ``_feature_blocks.`` prefix."""
    if isinstance(state, dict) and "classy_state_dict" in state:
        state = state["classy_state_dict"]
    for key in ("base_model", "model", "trunk"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PirlError("no trunk weights found (expected classy_state_dict.base_model.model.trunk)")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in ("module.", "trunk.", "base_model.", "_feature_blocks."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def import_vissl(checkpoint: str | Path, out_dir: str | Path, *, arch: str = "resnet50") -> Path:
    """Convert a VISSL PIRL/NPID checkpoint (``model_final_checkpoint_phase*.torch``) into a pirl export.

    Only the trunk is kept (VISSL's heads and memory bank are dropped); the result is evaluated like any export.
    """
    from pirl.checkpoint import atomic_write, safetensors_bytes
    from pirl.models.trunk import ARCHS, build_trunk, feature_dim

    if arch not in ARCHS:
        raise PirlError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    path = Path(checkpoint)
    if not path.is_file():
        raise PirlError(f"VISSL checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PirlError(
            f"{path}: cannot be read safely ({_first_line(err)}); if it holds non-tensor objects, "
            "re-save classy_state_dict.base_model.model.trunk alone with torch.save"
        ) from None
    weights = _vissl_trunk(state)
    trunk = build_trunk(arch, "imagenet")
    own = trunk.state_dict()
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    if missing or any(tuple(weights[k].shape) != tuple(own[k].shape) for k in own if k in weights):
        raise PirlError(
            f"{path}: trunk does not match {arch} ({len(missing)} missing tensors, e.g. "
            f"{(missing or ['a shape'])[0]}); pass --arch if it is not a ResNet-50"
        )
    weights = {k: weights[k].contiguous() if k in weights else own[k] for k in own}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.safetensors", lambda fh: fh.write(safetensors_bytes(weights)))
    meta = {
        "format": "pirl-export-1",
        "arch": arch,
        "stem": "imagenet",
        "feature_dim": feature_dim(trunk),
        "input_size": 224,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "method": "vissl",
        "source": path.name,
    }
    atomic_write(out / "config.json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    return out


# --- Detectron2 and timm out ----------------------------------------------------------------------------------


def detectron2_key(key: str) -> str:
    """torchvision ResNet key -> Detectron2 ResNet key (``layer1.0.bn1.weight`` -> ``res2.0.conv1.norm.weight``)."""
    if not key.startswith("layer"):
        key = "stem." + key
    for stage in range(1, 5):
        key = key.replace(f"layer{stage}.", f"res{stage + 1}.")
    for conv in range(1, 4):
        key = key.replace(f"bn{conv}.", f"conv{conv}.norm.")
    return key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def write_detectron2(weights: dict[str, torch.Tensor], path: Path, arch: str, stem: str) -> Path:
    """A Detectron2 checkpoint (pickled numpy arrays under ``model``, ``matching_heuristics``) of the trunk."""
    from pirl.checkpoint import atomic_write

    if stem != "imagenet":
        raise PirlError(f"--format detectron2 needs the ImageNet stem; this trunk has stem={stem}")
    if arch.startswith("timm:"):
        raise PirlError(f"--format detectron2 is for torchvision ResNets; this trunk is {arch}")
    model = {
        detectron2_key(k): v.detach().cpu().numpy() for k, v in weights.items() if not k.endswith("num_batches_tracked")
    }
    blob = {"model": model, "__author__": f"pirl ({arch})", "matching_heuristics": True}
    atomic_write(path, lambda fh: pickle.dump(blob, fh, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def timm_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` fields timm reads (``architecture``, ``pretrained_cfg``), beside pirl's own."""
    if meta["stem"] != "imagenet":
        raise PirlError(f"--format timm needs the ImageNet stem; this trunk has stem={meta['stem']}")
    size, name = int(meta["input_size"]), meta["arch"].removeprefix("timm:")
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": meta["feature_dim"],
        "pretrained_cfg": {
            "architecture": name,
            "num_classes": 0,
            "input_size": [3, size, size],
            "mean": list(meta["mean"]),
            "std": list(meta["std"]),
            "crop_pct": 0.875,
            "interpolation": "bilinear",
            **({} if meta["arch"].startswith("timm:") else {"classifier": "fc", "first_conv": "conv1"}),
        },
    }
