"""Configuration: dataclass schema, YAML presets shipped in the package, ``key=value`` overrides, validation.

The sections are ``data``, ``model``, ``method``, ``bank``, ``loss``, ``optim`` and ``train``; configs of the earlier
layout (the method's and the bank's keys in ``loss``) still load (:mod:`pirl.config.legacy`).
"""

from pirl.config.load import PRESETS, config_to_dict, load_config, validate
from pirl.config.schema import (
    BankConfig,
    Config,
    DataConfig,
    LossConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = [
    "PRESETS",
    "BankConfig",
    "Config",
    "DataConfig",
    "LossConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "validate",
]
