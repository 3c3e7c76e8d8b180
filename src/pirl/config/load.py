"""Resolve a config: schema defaults <- preset YAML <- overrides, then check every value."""

from __future__ import annotations

import dataclasses
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pirl.config.schema import Config
from pirl.errors import PirlError

PRESETS = ("imagenet-r50", "cifar10-r18", "cpu-quick")


def _preset_text(name: str) -> str:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise PirlError(f"config file not found: {name}")
        return path.read_text()
    if name not in PRESETS:
        raise PirlError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or pass a .yaml file")
    return resources.files("pirl.config").joinpath("presets", f"{name}.yaml").read_text()


def _parse_yaml(text: str, name: str) -> Any:
    """The preset or config file as an OmegaConf node; a YAML syntax error names the file, line and column."""
    import yaml

    try:
        return OmegaConf.create(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{name}, line {mark.line + 1}, column {mark.column + 1}" if mark else name
        what = err.problem or err.context or "syntax error"
        raise PirlError(f"YAML syntax error in {where}: {what}") from None
    except yaml.YAMLError as err:
        raise PirlError(f"YAML syntax error in {name}: {str(err).splitlines()[0] if str(err) else err}") from None


def _one_line(err: OmegaConfBaseException) -> str:
    msg = str(err).strip().splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def load_config(preset: str | None = None, overrides: Iterable[str] = (), base: dict | None = None) -> Config:
    """Build a validated :class:`Config` from a preset name (or YAML path), a saved dict and ``a.b=value`` strings."""
    schema = OmegaConf.structured(Config)
    try:
        if base is not None:
            schema = OmegaConf.merge(schema, OmegaConf.create(base))
        if preset:
            schema = OmegaConf.merge(schema, _parse_yaml(_preset_text(preset), preset))
        items = list(overrides)
        for item in items:
            if "=" not in item:
                raise PirlError(f"override {item!r} is not of the form section.key=value")
            key = item.split("=", 1)[0]
            if key.count(".") != 1:
                raise PirlError(f"unknown config key {key!r}; keys look like optim.epochs or loss.lam")
        schema = OmegaConf.merge(schema, OmegaConf.from_dotlist(items))
        cfg = OmegaConf.to_object(schema)
    except OmegaConfBaseException as err:
        raise PirlError(f"bad config: {_one_line(err)}") from None
    except Exception as err:  # YAML syntax errors and the like
        if isinstance(err, PirlError):
            raise
        raise PirlError(f"bad config: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists): safe for YAML, JSON and ``torch.load(weights_only=True)``."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def _check(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise PirlError(f"bad config value {key}={value!r}: {what}")


def _choice(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    _check(value in choices, key, value, f"must be one of {', '.join(choices)}")


def validate(cfg: Config) -> None:
    """Raise :class:`PirlError` naming the first impossible value."""
    from pirl.bank.kinds import BANK_DTYPE_NAMES, BANK_KINDS
    from pirl.models.archs import ARCHS, STEMS, is_timm_arch

    d, m, lo, o, t = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.train
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            key, value = f"{section.name}.{f.name}", getattr(getattr(cfg, section.name), f.name)
            numbers = value if isinstance(value, (tuple, list)) else (value,)
            _check(all(math.isfinite(v) for v in numbers if isinstance(v, float)), key, value, "must be finite")
            # torch and the data pipeline take C integers; the seed feeds 64-bit generators
            limit = 2**63 if key == "train.seed" else 2**31
            _check(all(abs(v) < limit for v in numbers if isinstance(v, int)), key, value, "is too large")
    for key, value in (("data.image_size", d.image_size), ("data.jigsaw_crop", d.jigsaw_crop),
                       ("data.patch_size", d.patch_size), ("data.grid", d.grid), ("model.embed_dim", m.embed_dim),
                       ("model.mlp_hidden", m.mlp_hidden), ("optim.epochs", o.epochs),
                       ("optim.batch_size", o.batch_size), ("loss.negatives", lo.negatives),
                       ("train.keep_checkpoints", t.keep_checkpoints), ("train.log_every", t.log_every),
                       ("train.knn_max_images", t.knn_max_images)):
        _check(value >= 1, key, value, "must be at least 1")
    for key, value in (("data.min_size", d.min_size), ("data.workers", d.workers), ("train.threads", t.threads),
                       ("train.checkpoint_every_steps", t.checkpoint_every_steps), ("data.subset", d.subset),
                       ("train.knn_every", t.knn_every),
                       ("optim.warmup_epochs", o.warmup_epochs), ("optim.weight_decay", o.weight_decay)):
        _check(value >= 0, key, value, "must not be negative")
    for key, scale in (("data.image_scale", d.image_scale), ("data.jigsaw_scale", d.jigsaw_scale)):
        _check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, key, list(scale), "needs 0 < low <= high <= 1")
    for key, triple in (("data.mean", d.mean), ("data.std", d.std)):
        _check(len(triple) == 3, key, list(triple), "needs three values (R, G, B)")
    _check(all(s > 0 for s in d.std), "data.std", list(d.std), "must be positive")
    cell = d.jigsaw_crop // d.grid
    _check(d.patch_size <= cell, "data.patch_size", d.patch_size,
           f"must fit in a jigsaw cell of data.jigsaw_crop // data.grid = {cell} pixels")
    _choice("data.augment", d.augment, ("vissl", "simclr_blur", "light", "none"))
    _check(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1]")
    if not is_timm_arch(m.arch):
        _check(m.arch in ARCHS, "model.arch", m.arch, f"must be one of {', '.join(ARCHS)} or timm:<model name>")
    else:
        _check(m.stem == "imagenet", "model.stem", m.stem, "must be imagenet for a timm trunk")
    _choice("model.stem", m.stem, STEMS)
    _choice("model.head", m.head, ("linear", "mlp"))
    if m.init:  # pirl.interop loads torch: only when there is something to check
        from pirl.interop import check_init

        init_problem = check_init(m.init)
        _check(init_problem is None, "model.init", m.init, init_problem or "")
    _choice("loss.method", lo.method, ("pirl", "npid", "jigsaw", "rotation", "supervised"))
    if lo.method == "jigsaw":
        most = min(math.factorial(min(d.grid ** 2, 10)), 100_000)  # 10! already exceeds the cap
        _check(2 <= lo.permutations <= most, "loss.permutations", lo.permutations,
               f"must be between 2 and {most:,} for data.grid={d.grid}")
    _choice("loss.pretext", lo.pretext, ("jigsaw", "rotation", "jigsaw_rotation"))
    _choice("loss.form", lo.form, ("infonce", "npid_nce", "paper_nce"))
    _choice("loss.bank_init", lo.bank_init, ("random", "features"))
    _choice("loss.bank", lo.bank, BANK_KINDS)
    _choice("loss.bank_dtype", lo.bank_dtype, BANK_DTYPE_NAMES)
    _check(0 <= lo.lam <= 1, "loss.lam", lo.lam, "must be in [0, 1]")
    _check(lo.temperature > 0, "loss.temperature", lo.temperature, "must be positive")
    _check(0 <= lo.bank_momentum < 1, "loss.bank_momentum", lo.bank_momentum, "must be in [0, 1)")
    _check(o.base_lr > 0, "optim.base_lr", o.base_lr, "must be positive")
    _check(0 <= o.final_lr_ratio <= 1, "optim.final_lr_ratio", o.final_lr_ratio, "must be in [0, 1]")
    _check(o.warmup_epochs < o.epochs, "optim.warmup_epochs", o.warmup_epochs, "must be below optim.epochs")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _choice("train.nonfinite", t.nonfinite, ("stop", "skip"))
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None, "train.device", t.device,
           "must be auto, cpu, cuda or cuda:N")
    _check(t.seed >= 0, "train.seed", t.seed, "must not be negative")
    _check(t.dist_timeout_s > 0, "train.dist_timeout_s", t.dist_timeout_s, "must be positive")
