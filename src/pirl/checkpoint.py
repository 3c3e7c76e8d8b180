"""Checkpoints (everything needed to continue a run) and exports (the trunk alone, torchvision keys).

Checkpoints are written atomically (temporary file, fsync, rename) and read with ``weights_only=True``, so a
checkpoint from a stranger cannot run code. Exports are safetensors plus a ``config.json`` that is enough to
rebuild the trunk with torchvision alone.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pirl.config.legacy import translate_tree
from pirl.errors import PirlError, WriteError

CHECKPOINT_FORMAT = "pirl-checkpoint-1"
_NAME = re.compile(r"checkpoint-e(\d+)-s(\d+)\.pt$")


def atomic_write(path: Path, write) -> None:
    """Write through ``write(file_object)`` into a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_name(epoch: int, step: int) -> str:
    """``epoch`` completed epochs plus ``step`` steps of the next one."""
    return f"checkpoint-e{epoch:04d}-s{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    found = [
        (tuple(map(int, m.groups())), p) for p in Path(run_dir).glob("checkpoint-*.pt") if (m := _NAME.search(p.name))
    ]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: Path, state: dict[str, Any], epoch: int, step: int, keep: int) -> Path:
    """Save atomically, then delete all but the newest ``keep`` checkpoints of the run.

    The one just written always stays: after resuming past a damaged checkpoint, that damaged file sorts
    as newer than the fresh ones.
    """
    run_dir = Path(run_dir)
    path = run_dir / checkpoint_name(epoch, step)
    buffer = io.BytesIO()  # serialised first: the size needed is known, and a failed write leaves only a temp file
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    blob = buffer.getbuffer()
    try:
        atomic_write(path, lambda fh: fh.write(blob))
    except OSError as err:
        raise WriteError(_write_failure(path, len(blob), err)) from None
    others = [p for p in list_checkpoints(run_dir) if p != path]
    for old in others[: max(0, len(others) - (keep - 1))]:
        old.unlink(missing_ok=True)
    return path


def _write_failure(path: Path, needed: int, err: OSError) -> str:
    try:
        free = f", {shutil.disk_usage(path.parent).free / 1e6:.1f} MB free"
    except OSError:
        free = ""
    previous = [p for p in list_checkpoints(path.parent) if p != path]
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint"
    return (
        f"cannot write checkpoint {path}: {err.strerror or err} (it needs {needed / 1e6:.1f} MB{free}); "
        f"{kept}; free space and run again with --resume"
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; a pickle that would run code, or a file that is no checkpoint, is refused."""
    path = Path(path)
    if not path.is_file():
        raise PirlError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError for unsafe globals, RuntimeError for corrupt zips, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PirlError(f"{path}: not a loadable pirl checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PirlError(f"{path}: not a pirl checkpoint")
    return state


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            raise KeyError(dotted)
        tree = tree[part]
    return tree


_CONFIG_FIELDS = {
    "model.arch": str,
    "model.stem": str,
    "data.image_size": int,
    "data.mean": list,
    "data.std": list,
    "method.name": str,
}


def _checkpoint_problem(state: dict[str, Any]) -> str | None:
    """What a loaded checkpoint lacks that evaluation, export or resuming reads; None when it is sound."""
    for key, kind in (("config", dict), ("method", dict), ("epoch", int), ("step", int)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"no {key!r} {kind.__name__}"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["method"].items()):
        return "'method' is not a mapping of names to tensors"
    return _config_problem(state["config"])


def _fields_problem(tree: Any, fields: dict[str, type], where: str) -> str | None:
    for dotted, kind in fields.items():
        try:
            value = _get(tree, dotted)
        except KeyError:
            return f"no {dotted}{where}"
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{dotted} is not a {kind.__name__}"
        if kind is list and (len(value) != 3 or not all(isinstance(v, (int, float)) for v in value)):
            return f"{dotted} is not three numbers"
    return None


def _config_problem(cfg: Any) -> str | None:
    return _fields_problem(translate_tree(cfg), _CONFIG_FIELDS, " in its config")  # either layout


_EXPORT_FIELDS = {"arch": str, "stem": str, "input_size": int, "mean": list, "std": list}


def _export_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "config.json is not a JSON object"
    return _fields_problem(meta, _EXPORT_FIELDS, "")


def load_latest(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest checkpoint in ``run_dir`` that loads; a damaged one is skipped with a warning."""
    import warnings

    for path in reversed(list_checkpoints(Path(run_dir))):
        try:
            return path, load_checkpoint(path, map_location)
        except PirlError as err:
            warnings.warn(f"skipping damaged checkpoint: {err}", stacklevel=2)
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint in ``run_dir`` that loads."""
    found = load_latest(run_dir)
    return found[0] if found else None


def open_checkpoint(run_or_checkpoint: str | Path) -> tuple[Path, dict[str, Any]]:
    """(path, state) of a checkpoint file as given, or of the latest loadable checkpoint of a run directory.

    The state must hold what evaluation and export read (config fields, trunk tensors, epoch and step).
    """
    path = Path(run_or_checkpoint)
    if path.is_dir():
        found = load_latest(path)
        if found is None:
            raise PirlError(f"no checkpoint found in run directory {path}")
    elif not path.exists():
        raise PirlError(f"no such run directory or checkpoint: {path}")
    else:
        found = path, load_checkpoint(path)
    problem = _checkpoint_problem(found[1])
    if problem:  # what evaluation and export read, checked here rather than met as a KeyError later
        raise PirlError(f"{found[0]}: malformed pirl checkpoint ({problem})")
    return found


def trunk_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Bare torchvision keys of the trunk, taken from a checkpoint's method state."""
    prefix = "encoder.trunk."
    return {k[len(prefix) :]: v for k, v in checkpoint["method"].items() if k.startswith(prefix)}


def export(run_or_checkpoint: str | Path, out_dir: str | Path, format: str = "torchvision") -> Path:
    """Write the trunk of a run, a checkpoint or an export into ``out_dir``.

    ``format="torchvision"``: ``model.safetensors`` (torchvision keys, no ``fc``) and ``config.json``.
    ``"timm"``: the same files, ``config.json`` also carrying timm's ``architecture`` and ``pretrained_cfg``.
    ``"detectron2"``: ``model.pkl``, Detectron2's ResNet key names as pickled numpy arrays.
    """
    from pirl.interop import EXPORT_FORMATS
    from pirl.models.trunk import build_trunk, feature_dim

    if format not in EXPORT_FORMATS:
        raise PirlError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    source = Path(run_or_checkpoint)
    if (source / "model.safetensors").is_file() and (source / "config.json").is_file():  # re-export an export
        trunk, meta = load_export(source)
        return _write_export(trunk.state_dict(), meta, Path(out_dir), format)
    _, ckpt = open_checkpoint(run_or_checkpoint)
    cfg = translate_tree(ckpt["config"])  # the export records the config in the current layout
    weights = {k: v.contiguous() for k, v in trunk_state_dict(ckpt).items()}
    trunk = build_trunk(cfg["model"]["arch"], cfg["model"]["stem"])
    missing, unexpected = trunk.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise PirlError(
            f"checkpoint trunk does not match {cfg['model']['arch']}: "
            f"{len(missing)} missing, {len(unexpected)} unexpected keys"
        )
    meta = {
        "format": "pirl-export-1",
        "arch": cfg["model"]["arch"],
        "stem": cfg["model"]["stem"],
        "feature_dim": feature_dim(trunk),
        "input_size": cfg["data"]["image_size"],
        "mean": cfg["data"]["mean"],
        "std": cfg["data"]["std"],
        "method": cfg["method"]["name"],
        "epoch": ckpt["epoch"],
        "training_config": cfg,
    }
    return _write_export(weights, meta, Path(out_dir), format)


def _write_export(weights: dict[str, torch.Tensor], meta: dict[str, Any], out: Path, format: str) -> Path:
    from pirl.interop import timm_config, write_detectron2

    if format == "detectron2":
        write_detectron2(weights, out / "model.pkl", meta["arch"], meta["stem"])
        return out
    extra = timm_config(meta) if format == "timm" else {}  # refuses a CIFAR stem before anything is written
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in weights.items()}
    atomic_write(out / "model.safetensors", lambda fh: fh.write(safetensors_bytes(weights)))
    atomic_write(out / "config.json", lambda fh: fh.write(json.dumps({**meta, **extra}, indent=2).encode()))
    return out


def safetensors_bytes(weights: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(weights, metadata={"format": "pt"})


def load_export(export_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the trunk of an export (for evaluation); returns (trunk with ``fc = Identity``, config.json)."""
    from safetensors.torch import load_file

    from pirl.models.trunk import build_trunk

    export_dir = Path(export_dir)
    cfg_path, weights_path = export_dir / "config.json", export_dir / "model.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise PirlError(f"{export_dir} is not a pirl export (needs config.json and model.safetensors)")
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise PirlError(f"{cfg_path}: not readable JSON ({str(err).splitlines()[0][:200]})") from None
    problem = _export_problem(meta)
    if problem:
        raise PirlError(f"{cfg_path}: malformed pirl export ({problem})")
    trunk = build_trunk(meta["arch"], meta["stem"])
    try:
        trunk.load_state_dict(load_file(weights_path))
    except Exception as err:
        raise PirlError(f"{weights_path}: cannot load ({str(err).splitlines()[0][:200]})") from None
    return trunk, meta
