"""The Python API: pretrain, export, load and evaluate with the same checks as the command line.

import pirl
run = pirl.pretrain("cpu-quick", "images/", "runs/a", overrides={"optim.epochs": 5})
run.export("exports/a")                       # or pirl.export(run.run_dir, "exports/a", format="timm")
model = pirl.load_model("exports/a")          # .trunk is a torchvision ResNet (fc = Identity)
print(pirl.evaluate.knn("exports/a", "labelled/")["top1"])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pirl.config import Config, config_to_dict, load_config, validate
from pirl.errors import PirlError


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns: where the run is and how it ended."""

    run_dir: Path
    checkpoint: Path | None
    epochs: int
    loss: float
    num_samples: int
    stopped: str | None = None  # "SIGINT" / "SIGTERM" when the run was interrupted (the checkpoint is kept)
    summary: dict[str, Any] = field(default_factory=dict)  # the full summary, as the CLI prints it

    def export(self, out_dir: str | Path, format: str = "torchvision") -> Path:
        """Export this run's latest checkpoint (see :func:`pirl.export`)."""
        return export(self.run_dir, out_dir, format=format)


def _override_strings(overrides: Mapping[str, Any] | Iterable[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):

        def text(v: Any) -> str:
            if isinstance(v, bool):
                return str(v).lower()
            if isinstance(v, (list, tuple)):
                return "[" + ",".join(text(x) for x in v) + "]"
            return str(v)

        return [f"{k}={text(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        raise PirlError("overrides must be a mapping or a list of 'section.key=value' strings, not one string")
    return list(overrides)


SECTIONS = ("data", "model", "method", "bank", "loss", "optim", "train")


def _keyword_overrides(settings: Mapping[str, Any]) -> list[str]:
    """``optim_epochs=5`` -> ``optim.epochs=5`` (section names have no underscore, so the split is unambiguous)."""
    out = []
    for name, value in settings.items():
        section, _, key = name.partition("_")
        if section not in SECTIONS or not key:
            raise PirlError(
                f"unknown keyword {name!r}; config keys are given as section_key, e.g. optim_epochs=5 "
                f"(sections: {', '.join(SECTIONS)})"
            )
        out.extend(_override_strings({f"{section}.{key}": value}))
    return out


def resolve_config(
    config: Config | str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> Config:
    """A validated :class:`Config` from a preset name, a YAML path, a :class:`Config`, or a nested dict, with
    ``overrides`` (``{"optim.epochs": 5}`` or ``["optim.epochs=5"]``) applied on top. Bad values raise
    :class:`~pirl.errors.PirlError` naming the key, exactly as on the command line."""
    items = _override_strings(overrides)
    if isinstance(config, Config):
        validate(config)  # a Config built or edited by hand gets the same checks as a loaded one
        return load_config(None, items, base=config_to_dict(config))
    if isinstance(config, Mapping):
        return load_config(None, items, base=dict(config))
    return load_config(str(config) if config is not None else "cpu-quick", items)


def pretrain(
    config: Config | str | Path | Mapping[str, Any] | None,
    data: Any,
    out: str | Path,
    *,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    resume: bool = False,
    val_data: Any = None,
    data_root: str | None = None,
    download: bool = False,
    progress: bool = True,
    **settings: Any,
) -> PretrainResult:
    """Pretrain a trunk: the Python form of ``pirl train``.

    Config keys can also be given as keywords, the section and the key joined by ``_``:
    ``pirl.pretrain("cpu-quick", "images/", "runs/a", optim_epochs=5, method_lam=0.25)``.

    ``config``: a preset (``"cpu-quick"``, ``"cifar10-r18"``, ``"imagenet-r50"``), a YAML path, a :class:`Config`
    or a nested dict (None: cpu-quick). ``data``: a folder, an archive, a torchvision dataset name or an
    :class:`~pirl.data.sources.ImageSource`. ``out``: the run directory. With ``resume``, the run continues from
    its latest checkpoint and its own config (``overrides`` still apply).
    """
    from pirl.checkpoint import load_latest
    from pirl.training import train

    overrides = [*_override_strings(overrides), *_keyword_overrides(settings)]
    found = load_latest(out) if resume and Path(out).is_dir() else None
    cfg = (
        load_config(None, _override_strings(overrides), base=found[1]["config"])
        if found
        else resolve_config(config, overrides)
    )
    s = train(
        cfg, data, out, resume=resume, data_root=data_root, download=download, progress=progress, val_data=val_data
    )
    return PretrainResult(
        Path(s["run_dir"]),
        Path(s["checkpoint"]) if s.get("checkpoint") else None,
        int(s["epochs"]),
        float(s["loss"]),
        int(s["num_samples"]),
        s.get("stopped"),
        s,
    )


def export(run_or_checkpoint: str | Path, out_dir: str | Path, format: str = "torchvision") -> Path:
    """Write a trunk (from a run directory, a checkpoint or an export) as ``format``: ``"torchvision"``
    (model.safetensors + config.json), ``"timm"`` (the same, config.json with timm's pretrained_cfg) or
    ``"detectron2"`` (model.pkl). Returns the output directory."""
    from pirl.checkpoint import export as _export

    return _export(run_or_checkpoint, out_dir, format=format)


def load_model(spec: str | Path, *, random_init: bool = False, seed: int = 0):
    """A :class:`~pirl.eval.models.LoadedModel` (``.trunk`` in eval mode, ``.arch``, ``.input_size``, ``.mean``,
    ``.std``) from an export, a run directory, a checkpoint or ``torchvision:<weights enum>``."""
    from pirl.eval.models import load_model as _load

    return _load(spec, random_init=random_init, seed=seed)


def import_vissl(checkpoint: str | Path, out_dir: str | Path, *, arch: str = "resnet50") -> Path:
    """Convert a VISSL PIRL/NPID checkpoint into a pirl export (see :mod:`pirl.interop`)."""
    from pirl.interop import import_vissl as _import

    return _import(checkpoint, out_dir, arch=arch)
