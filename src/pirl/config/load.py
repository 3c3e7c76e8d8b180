"""Resolve a config: schema defaults <- preset YAML <- overrides, then check every value."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pirl.config.checks import ConfigValueError, check, choice
from pirl.config.legacy import translate_override, translate_tree
from pirl.config.schema import Config
from pirl.data.augment import AUGMENTATIONS
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


def _one_line(err: OmegaConfBaseException, spelled: dict[str, str]) -> str:
    msg = str(err).strip().splitlines()[0]
    key = getattr(err, "full_key", None)
    line = f"{key}: {msg}" if key and key not in msg else msg
    if key in spelled:  # given under its old name: say it so, and the new one
        line = f"{line.replace(key, spelled[key])} ({spelled[key]} is now {key})"
    return line


def _translated_yaml(node: Any, spelled: dict[str, str]) -> Any:
    """A preset or config file in the current layout (its old ``loss.*`` keys moved, :mod:`pirl.config.legacy`)."""
    tree = OmegaConf.to_container(node, resolve=False)
    return OmegaConf.create(translate_tree(tree, spelled)) if isinstance(tree, dict) else node


def load_config(preset: str | None = None, overrides: Iterable[str] = (), base: dict | None = None) -> Config:
    """Build a validated :class:`Config` from a preset name (or YAML path), a saved dict and ``a.b=value`` strings.

    All three may use the keys of the earlier layout (``loss.method``, ``loss.lam``, ``loss.bank``, ...); an
    error about such a key names it as it was given, and its new name.
    """
    schema = OmegaConf.structured(Config)
    spelled: dict[str, str] = {}  # new key -> the old name it was given under
    try:
        if base is not None:
            schema = OmegaConf.merge(schema, OmegaConf.create(translate_tree(base, spelled)))
        if preset:
            schema = OmegaConf.merge(schema, _translated_yaml(_parse_yaml(_preset_text(preset), preset), spelled))
        items = list(overrides)
        for item in items:
            if "=" not in item:
                raise PirlError(f"override {item!r} is not of the form section.key=value")
            key = item.split("=", 1)[0]
            if key.count(".") != 1:
                raise PirlError(f"unknown config key {key!r}; keys look like optim.epochs or method.lam")
        schema = OmegaConf.merge(schema, OmegaConf.from_dotlist([translate_override(i, spelled) for i in items]))
        cfg = OmegaConf.to_object(schema)
    except OmegaConfBaseException as err:
        raise PirlError(f"bad config: {_one_line(err, spelled)}") from None
    except Exception as err:  # YAML syntax errors and the like
        if isinstance(err, PirlError):
            raise
        raise PirlError(f"bad config: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    try:
        validate(cfg)
    except ConfigValueError as err:
        if err.key in spelled:
            raise PirlError(err.spelled(spelled[err.key])) from None
        raise
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


def validate(cfg: Config) -> None:
    """Raise :class:`PirlError` naming the first impossible value.

    The keys of ``data``, ``model``, ``loss``, ``optim`` and ``train`` are checked here; the method checks its
    own (``validate`` of its class in :data:`pirl.methods.METHODS`), the bank its (:func:`pirl.bank.kinds.validate`).
    """
    from pirl.bank.kinds import validate as validate_bank
    from pirl.models.archs import ARCHS, STEMS, is_timm_arch

    d, m, lo, o, t = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.train
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            key, value = f"{section.name}.{f.name}", getattr(getattr(cfg, section.name), f.name)
            numbers = value if isinstance(value, (tuple, list)) else (value,)
            check(all(math.isfinite(v) for v in numbers if isinstance(v, float)), key, value, "must be finite")
            # torch and the data pipeline take C integers; the seed feeds 64-bit generators
            limit = 2**63 if key == "train.seed" else 2**31
            check(all(abs(v) < limit for v in numbers if isinstance(v, int)), key, value, "is too large")
    for key, value in (
        ("data.image_size", d.image_size),
        ("data.jigsaw_crop", d.jigsaw_crop),
        ("data.patch_size", d.patch_size),
        ("data.grid", d.grid),
        ("model.embed_dim", m.embed_dim),
        ("model.mlp_hidden", m.mlp_hidden),
        ("optim.epochs", o.epochs),
        ("optim.batch_size", o.batch_size),
        ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.log_every", t.log_every),
        ("train.knn_max_images", t.knn_max_images),
    ):
        check(value >= 1, key, value, "must be at least 1")
    for key, value in (
        ("data.min_size", d.min_size),
        ("data.workers", d.workers),
        ("train.threads", t.threads),
        ("train.checkpoint_every_steps", t.checkpoint_every_steps),
        ("data.subset", d.subset),
        ("train.knn_every", t.knn_every),
        ("optim.warmup_epochs", o.warmup_epochs),
        ("optim.weight_decay", o.weight_decay),
    ):
        check(value >= 0, key, value, "must not be negative")
    for key, scale in (("data.image_scale", d.image_scale), ("data.jigsaw_scale", d.jigsaw_scale)):
        check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, key, list(scale), "needs 0 < low <= high <= 1")
    for key, triple in (("data.mean", d.mean), ("data.std", d.std)):
        check(len(triple) == 3, key, list(triple), "needs three values (R, G, B)")
    check(all(s > 0 for s in d.std), "data.std", list(d.std), "must be positive")
    cell = d.jigsaw_crop // d.grid
    check(
        d.patch_size <= cell,
        "data.patch_size",
        d.patch_size,
        f"must fit in a jigsaw cell of data.jigsaw_crop // data.grid = {cell} pixels",
    )
    choice("data.augment", d.augment, AUGMENTATIONS)
    check(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1]")
    if not is_timm_arch(m.arch):
        check(m.arch in ARCHS, "model.arch", m.arch, f"must be one of {', '.join(ARCHS)} or timm:<model name>")
    else:
        check(m.stem == "imagenet", "model.stem", m.stem, "must be imagenet for a timm trunk")
    choice("model.stem", m.stem, STEMS)
    choice("model.head", m.head, ("linear", "mlp"))
    if m.init:  # pirl.interop loads torch: only when there is something to check
        from pirl.interop import check_init

        init_problem = check_init(m.init)
        check(init_problem is None, "model.init", m.init, init_problem or "")
    from pirl.methods import METHODS  # the method's module: torch

    choice("method.name", cfg.method.name, METHODS)
    METHODS[cfg.method.name].validate(cfg)
    choice("loss.form", lo.form, ("infonce", "npid_nce", "paper_nce"))
    check(lo.temperature > 0, "loss.temperature", lo.temperature, "must be positive")
    validate_bank(cfg)
    check(o.base_lr > 0, "optim.base_lr", o.base_lr, "must be positive")
    check(0 <= o.final_lr_ratio <= 1, "optim.final_lr_ratio", o.final_lr_ratio, "must be in [0, 1]")
    check(o.warmup_epochs < o.epochs, "optim.warmup_epochs", o.warmup_epochs, "must be below optim.epochs")
    check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    choice("train.nonfinite", t.nonfinite, ("stop", "skip"))
    check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
        "train.device",
        t.device,
        "must be auto, cpu, cuda or cuda:N",
    )
    check(t.seed >= 0, "train.seed", t.seed, "must not be negative")
    check(t.dist_timeout_s > 0, "train.dist_timeout_s", t.dist_timeout_s, "must be positive")
